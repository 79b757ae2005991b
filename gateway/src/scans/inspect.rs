//! What an upload must be to be accepted: its size, its magic bytes, its
//! decoded header's dimensions (so a decompression bomb is refused from its
//! header) and its format's end marker (so a truncated file is refused too),
//! checked without decoding a pixel. Pixels are the streamer's.

use std::io::Cursor;

use axum::http::StatusCode;
use bus::wire::{MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES};

/// Longest side either dimension may have, whatever the pixel count: a
/// 1 x 10^6 strip is as useless to the model as it is costly to resize.
const MAX_SIDE: u32 = 20_000;

/// An image format the pipeline accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JPEG.
    Jpeg,
    /// PNG.
    Png,
    /// WebP.
    Webp,
}

impl Format {
    /// Recognises the format from the file's first bytes, whatever the
    /// client claimed.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(Self::Webp)
        } else {
            None
        }
    }

    /// Its media type.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Webp => "image/webp",
        }
    }

    fn image_format(self) -> image::ImageFormat {
        match self {
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Png => image::ImageFormat::Png,
            Self::Webp => image::ImageFormat::WebP,
        }
    }

    /// True when the file ends the way a complete file of this format
    /// ends: cheap, and catches uploads cut off in transit.
    fn looks_complete(self, bytes: &[u8]) -> bool {
        match self {
            // EOI; some encoders pad after it, so look at the tail.
            Self::Jpeg => bytes[bytes.len().saturating_sub(64)..]
                .windows(2)
                .any(|w| w == [0xFF, 0xD9]),
            // The IEND chunk: length 0, type, CRC.
            Self::Png => bytes.ends_with(b"\0\0\0\0IEND\xAE\x42\x60\x82"),
            // RIFF's own length field covers the rest of the file.
            Self::Webp => {
                let declared = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                declared as usize + 8 <= bytes.len()
            }
        }
    }
}

/// Why an upload was refused: the status, a specific code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 413 or 415.
    pub status: StatusCode,
    /// A stable code.
    pub code: &'static str,
    /// What to fix.
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

/// What the checks learnt about an accepted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspected {
    /// The format from the magic bytes.
    pub format: Format,
    /// Width from the header.
    pub width: u32,
    /// Height from the header.
    pub height: u32,
}

/// Checks an upload without decoding its pixels.
///
/// # Errors
/// A [`Refusal`] naming what is wrong.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, Refusal> {
    if bytes.is_empty() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "empty_upload",
            "the upload is empty",
        ));
    }
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(too_large());
    }
    let format = Format::sniff(bytes).ok_or_else(|| {
        Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image_type",
            "the file is not a JPEG, PNG or WebP image",
        )
    })?;
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format.image_format());
    let (width, height) = reader.into_dimensions().map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "corrupt_image",
            format!("the {} header cannot be read: {e}", format.mime()),
        )
    })?;
    if width == 0 || height == 0 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "corrupt_image",
            "the image has no pixels",
        ));
    }
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS
        || width > MAX_SIDE
        || height > MAX_SIDE
    {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_pixels",
            format!(
                "the image is {width} x {height} pixels; at most {MAX_IMAGE_PIXELS} pixels and {MAX_SIDE} per side are accepted"
            ),
        ));
    }
    if !format.looks_complete(bytes) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "truncated_image",
            format!("the {} file is cut off before its end", format.mime()),
        ));
    }
    Ok(Inspected {
        format,
        width,
        height,
    })
}

pub(crate) fn too_large() -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("uploads are limited to {MAX_UPLOAD_BYTES} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_complete_png_passes_and_reports_its_size() {
        let i = inspect(&png(7, 5)).unwrap();
        assert_eq!((i.format, i.width, i.height), (Format::Png, 7, 5));
    }

    #[test]
    fn truncated_wrong_and_empty_files_are_refused_specifically() {
        let full = png(64, 64);
        assert_eq!(
            inspect(&full[..full.len() - 10]).unwrap_err().code,
            "truncated_image"
        );
        assert_eq!(
            inspect(b"GIF89a....").unwrap_err().code,
            "unsupported_image_type"
        );
        assert_eq!(inspect(b"").unwrap_err().code, "empty_upload");
        assert_eq!(
            inspect(&full[..20]).unwrap_err().code,
            "corrupt_image",
            "a PNG cut inside its header"
        );
    }
}
