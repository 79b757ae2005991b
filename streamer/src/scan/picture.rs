//! The image stages: decoding with EXIF orientation, fingerprints (SHA-256
//! and the perceptual hash), shrinking for the model, off the async threads.

use super::*;

/// Longest side of the image handed to vision.
const MAX_SIDE: u32 = 1024;

/// What the hashing stage learnt.
pub(super) struct Hashed {
    pub(super) image: DynamicImage,
    pub(super) sha256: String,
    pub(super) phash: String,
}

/// Runs CPU-bound work off the async threads; a panic inside becomes a
/// failed scan rather than a crashed worker.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Stop> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(failure)) => Err(Stop::Failed(failure)),
        Err(e) => Err(Stop::Failed(Failure {
            code: "internal",
            message: format!("image processing failed: {e}"),
            stage: ScanStage::Preprocessed,
            dead_letter: true,
        })),
    }
}

/// Decodes (honouring EXIF orientation) and fingerprints the upload.
pub(super) fn hash(bytes: &[u8]) -> Result<Hashed, Failure> {
    let corrupt = |e: image::ImageError| {
        Failure::input(
            "corrupt_image",
            format!("the image cannot be decoded: {e}"),
            ScanStage::Hashed,
        )
    };
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| corrupt(image::ImageError::IoError(e)))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(512 * 1024 * 1024);
    limits.max_image_width = Some(20_000);
    limits.max_image_height = Some(20_000);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    // Everything after this (the hash, the model) works on at most
    // MAX_SIDE pixels; shrinking once here, with the fast box filter,
    // costs a fraction of a filtered resize of a 12-megapixel photo.
    if image.width().max(image.height()) > MAX_SIDE {
        image = image.thumbnail(MAX_SIDE, MAX_SIDE);
    }
    let sha256 = sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let phash = phash(&image);
    Ok(Hashed {
        image,
        sha256,
        phash,
    })
}

/// Makes the model's input: RGB pixels (already at most [`MAX_SIDE`]) and,
/// when the provider wants bytes, the JPEG it takes.
pub(super) fn prepare(image: DynamicImage, jpeg_wanted: bool) -> Result<PreparedImage, Failure> {
    let image = if image.width().max(image.height()) > MAX_SIDE {
        image.thumbnail(MAX_SIDE, MAX_SIDE)
    } else {
        image
    };
    let rgb = image.to_rgb8();
    if !jpeg_wanted {
        return Ok(PreparedImage {
            rgb: Arc::new(rgb),
            jpeg: bytes::Bytes::new(),
        });
    }
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode_image(&rgb)
        .map_err(|e| Failure {
            code: "internal",
            message: format!("cannot encode the prepared image: {e}"),
            stage: ScanStage::Preprocessed,
            dead_letter: true,
        })?;
    Ok(PreparedImage {
        rgb: Arc::new(rgb),
        jpeg: jpeg.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG with an EXIF APP1 segment saying "rotate 90 degrees clockwise".
    fn jpeg_with_orientation(width: u32, height: u32, orientation: u8) -> Vec<u8> {
        let mut jpeg = Vec::new();
        DynamicImage::ImageRgb8(image::RgbImage::new(width, height))
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        let mut exif = b"Exif\0\0II\x2a\x00\x08\x00\x00\x00\x01\x00".to_vec();
        exif.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, orientation, 0, 0, 0]);
        exif.extend_from_slice(&[0, 0, 0, 0]);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&exif);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied_before_hashing() {
        let upright = hash(&jpeg_with_orientation(40, 16, 1)).unwrap();
        assert_eq!((upright.image.width(), upright.image.height()), (40, 16));
        let rotated = hash(&jpeg_with_orientation(40, 16, 6)).unwrap();
        assert_eq!((rotated.image.width(), rotated.image.height()), (16, 40));
        assert_eq!(rotated.sha256.len(), 64);
    }

    #[test]
    fn large_images_shrink_to_the_vision_size_keeping_their_shape() {
        let big = DynamicImage::ImageRgb8(image::RgbImage::new(3000, 1500));
        let prepared = prepare(big, true).unwrap();
        assert_eq!((prepared.rgb.width(), prepared.rgb.height()), (1024, 512));
        assert!(image::load_from_memory(&prepared.jpeg).is_ok());
    }

    #[test]
    fn corrupt_bytes_fail_as_input_errors_without_a_dead_letter() {
        let failure = hash(b"\xFF\xD8\xFF\xE0garbage").err().unwrap();
        assert_eq!(failure.code, "corrupt_image");
        assert!(!failure.dead_letter);
    }
}
