//! Perceptual hash (the DCT "pHash"): 64 bits that stay the same when a
//! photo is re-encoded, resized or slightly recoloured, so the same item
//! scanned again hits the cache although its bytes differ.

use image::{DynamicImage, imageops::FilterType};

const SIDE: usize = 32;
const KEEP: usize = 8;

/// The 64-bit pHash of `image`, as 16 lowercase hex digits.
pub fn phash(image: &DynamicImage) -> String {
    let small = image
        .resize_exact(SIDE as u32, SIDE as u32, FilterType::Triangle)
        .to_luma32f();
    let pixels: Vec<f32> = small.into_raw();
    // The 8 x 8 lowest frequencies of a 2-D DCT-II: the image's coarse shape.
    let cos: Vec<f32> = (0..KEEP * SIDE)
        .map(|i| {
            let (u, x) = (i / SIDE, i % SIDE);
            ((2 * x + 1) as f32 * u as f32 * std::f32::consts::PI / (2 * SIDE) as f32).cos()
        })
        .collect();
    let mut rows = [[0f32; KEEP]; SIDE];
    for (y, row) in rows.iter_mut().enumerate() {
        for (u, out) in row.iter_mut().enumerate() {
            *out = (0..SIDE)
                .map(|x| pixels[y * SIDE + x] * cos[u * SIDE + x])
                .sum();
        }
    }
    let mut coefficients = [0f32; KEEP * KEEP];
    for v in 0..KEEP {
        for u in 0..KEEP {
            coefficients[v * KEEP + u] = (0..SIDE).map(|y| rows[y][u] * cos[v * SIDE + y]).sum();
        }
    }
    // The DC term is the mean brightness: left out of the median so one
    // bright photo does not flip every bit.
    let mut sorted = coefficients[1..].to_vec();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[sorted.len() / 2];
    let bits =
        coefficients.iter().enumerate().fold(
            0u64,
            |acc, (i, c)| if *c > median { acc | (1 << i) } else { acc },
        );
    format!("{bits:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(name: &str) -> DynamicImage {
        let path = format!(
            "{}/tests/fixtures/images/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        image::open(path).unwrap()
    }

    fn distance(a: &str, b: &str) -> u32 {
        (u64::from_str_radix(a, 16).unwrap() ^ u64::from_str_radix(b, 16).unwrap()).count_ones()
    }

    #[test]
    fn survives_resizing_and_reencoding_but_tells_photos_apart() {
        let original = photo("coffee.jpg");
        let hash = phash(&original);
        assert_eq!(hash.len(), 16);
        let half = original.resize(
            original.width() / 2,
            original.height() / 2,
            FilterType::Lanczos3,
        );
        assert!(distance(&hash, &phash(&half)) <= 4);
        let mut jpeg = Vec::new();
        original
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        let reencoded = image::load_from_memory(&jpeg).unwrap();
        assert!(distance(&hash, &phash(&reencoded)) <= 4);
        for other in ["rocket.jpg", "astronaut.jpg", "chelsea.png"] {
            assert!(distance(&hash, &phash(&photo(other))) > 16, "{other}");
        }
    }
}
