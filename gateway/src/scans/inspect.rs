//! What an upload must be to be accepted: its size, its magic bytes, its
//! decoded header's dimensions (so a decompression bomb is refused from its
//! header) and its format's end marker (so a truncated file is refused too),
//! checked without decoding a pixel. Pixels are the streamer's.
//!
//! The checks run while the upload streams past ([`Inspector`]), so the
//! gateway never holds a whole image: of the bytes it sees it keeps the
//! first ones until the header has been read and the last few for the end
//! marker. Why that suffices, and where it differs from holding the whole
//! file, is on [`HEAD_CAP`].

use std::io::Cursor;

use axum::http::StatusCode;
use bus::wire::{MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES};

/// Longest side either dimension may have, whatever the pixel count: a
/// 1 x 10^6 strip is as useless to the model as it is costly to resize.
const MAX_SIDE: u32 = 20_000;

/// Most of an upload's start kept in memory while its header is unread.
///
/// Reading the dimensions needs the header, and the image decoders want it
/// as one contiguous buffer (the JPEG decoder even copies in everything it
/// is given), so the start of the upload is kept until the header parses.
/// JPEG (every marker up to the first scan) and PNG (every chunk before the
/// first IDAT) put their header first, and a camera's, EXIF thumbnail
/// included, fits in a few dozen KiB; the header usually parses at the
/// first try and the buffer is dropped. The cap bounds what a hostile file
/// can make us keep: one whose header does not parse within it is refused
/// as `corrupt_image`, as an unreadable header always was. An upload no
/// larger than the cap is checked exactly as the whole file.
///
/// The one layout that spreads header facts over the whole file is the
/// extended WebP (VP8X), whose EXIF and XMP chunks come after the image
/// data while their presence is flagged up front; past the cap the header
/// is read without those two flags, since the gateway needs the dimensions,
/// not the metadata, and the streamer's full decode still refuses a file
/// that lies about them.
///
/// The alternative, running the checks on the stored object afterwards,
/// would read the whole image back into memory (for the JPEG decoder) and
/// store every refused upload first.
pub(crate) const HEAD_CAP: usize = 1024 * 1024;
/// Head length at which the header is first tried; each failure doubles it
/// (up to [`HEAD_CAP`]), so a header is parsed a handful of times at most.
const FIRST_TRY: usize = 16 * 1024;
/// How much of the file's end the end markers' checks look at.
const TAIL: usize = 64;
/// Bytes [`Format::sniff`] needs to tell every format apart.
const SNIFF: usize = 12;

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

    /// Width and height from the header at the start of `head`.
    fn dimensions(self, head: &[u8]) -> image::ImageResult<(u32, u32)> {
        image::ImageReader::with_format(Cursor::new(head), self.image_format()).into_dimensions()
    }

    fn image_format(self) -> image::ImageFormat {
        match self {
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Png => image::ImageFormat::Png,
            Self::Webp => image::ImageFormat::WebP,
        }
    }

    /// True when a file of `len` bytes that starts with `start` (at least
    /// [`SNIFF`] bytes of it) and ends with `tail` (at least [`TAIL`] bytes
    /// of it) ends the way a complete file of this format ends: cheap, and
    /// catches uploads cut off in transit.
    fn looks_complete(self, start: &[u8], tail: &[u8], len: usize) -> bool {
        match self {
            // EOI; some encoders pad after it, so look at the tail.
            Self::Jpeg => tail[tail.len().saturating_sub(TAIL)..]
                .windows(2)
                .any(|w| w == [0xFF, 0xD9]),
            // The IEND chunk: length 0, type, CRC.
            Self::Png => tail.ends_with(b"\0\0\0\0IEND\xAE\x42\x60\x82"),
            // RIFF's own length field covers the rest of the file.
            Self::Webp => {
                let declared = u32::from_le_bytes([start[4], start[5], start[6], start[7]]);
                declared as usize + 8 <= len
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

/// Checks a whole upload without decoding its pixels.
///
/// # Errors
/// A [`Refusal`] naming what is wrong.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, Refusal> {
    let mut inspector = Inspector::new();
    inspector.feed(bytes)?;
    inspector.finish()
}

/// The checks of [`inspect`], run on an upload as it arrives.
#[derive(Debug)]
pub(crate) struct Inspector {
    /// Bytes seen so far.
    len: usize,
    /// The upload's first bytes, up to [`HEAD_CAP`], while the header is
    /// unread; empty once it is read or the upload is refused.
    head: Vec<u8>,
    /// The first [`SNIFF`] bytes, for the magic bytes and WebP's length.
    start: Vec<u8>,
    /// The last [`TAIL`] bytes, for the end markers.
    tail: Vec<u8>,
    /// From the magic bytes.
    format: Option<Format>,
    /// From the header.
    dimensions: Option<(u32, u32)>,
    /// Head length at which the header is tried next.
    next_try: usize,
    /// A refusal already certain whatever follows, short of the upload
    /// growing too large (which is refused first, as it always was).
    refusal: Option<Refusal>,
}

impl Inspector {
    pub(crate) fn new() -> Self {
        Self {
            len: 0,
            head: Vec::new(),
            start: Vec::with_capacity(SNIFF),
            tail: Vec::with_capacity(2 * TAIL),
            format: None,
            dimensions: None,
            next_try: FIRST_TRY,
            refusal: None,
        }
    }

    /// Takes the upload's next bytes.
    ///
    /// # Errors
    /// `too_large` once the upload is over the limit: the one refusal that
    /// needs no more of the body.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        self.len += bytes.len();
        if self.len > MAX_UPLOAD_BYTES {
            return Err(too_large());
        }
        keep_last(&mut self.tail, bytes, TAIL);
        let missing = SNIFF - self.start.len();
        self.start
            .extend_from_slice(&bytes[..missing.min(bytes.len())]);
        if self.refusal.is_some() || self.dimensions.is_some() {
            return Ok(());
        }
        let taken = &bytes[..(HEAD_CAP - self.head.len()).min(bytes.len())];
        if self.head.capacity() < self.head.len() + taken.len() {
            // Doubling, but never past the cap: the cap is the promise.
            let want = (self.head.len() + taken.len())
                .max(2 * self.head.capacity())
                .min(HEAD_CAP);
            self.head.reserve_exact(want - self.head.len());
        }
        self.head.extend_from_slice(taken);
        if self.format.is_none() && self.start.len() == SNIFF {
            match Format::sniff(&self.start) {
                Some(format) => self.format = Some(format),
                None => self.refuse(not_an_image()),
            }
        }
        // Once the head is full and more has come, it cannot grow: decide.
        let full = self.len > self.head.len();
        if self.format.is_some()
            && self.refusal.is_none()
            && (self.head.len() >= self.next_try || full)
        {
            self.read_header(false);
        }
        Ok(())
    }

    /// True once the upload is refused whatever follows: nothing more of it
    /// needs storing.
    pub(crate) fn refused(&self) -> bool {
        self.refusal.is_some()
    }

    /// The verdict on the whole upload.
    ///
    /// # Errors
    /// A [`Refusal`] naming what is wrong.
    pub(crate) fn finish(mut self) -> Result<Inspected, Refusal> {
        if self.len == 0 {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "empty_upload",
                "the upload is empty",
            ));
        }
        if self.refusal.is_none() && self.format.is_none() {
            // Shorter than SNIFF: the formats that fit may still match.
            match Format::sniff(&self.start) {
                Some(format) => self.format = Some(format),
                None => self.refuse(not_an_image()),
            }
        }
        if self.refusal.is_none() && self.dimensions.is_none() {
            self.read_header(true);
        }
        if let Some(refusal) = self.refusal {
            return Err(refusal);
        }
        let (Some(format), Some((width, height))) = (self.format, self.dimensions) else {
            unreachable!("an upload that is not refused has a format and dimensions");
        };
        if !format.looks_complete(&self.start, &self.tail, self.len) {
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

    /// Tries the header on the head. A failure is final once the head holds
    /// the whole upload (`finished`) or cannot grow; otherwise the header
    /// may simply not have arrived yet.
    fn read_header(&mut self, finished: bool) {
        let Some(format) = self.format else { return };
        let beyond = self.len > self.head.len();
        let read = match format.dimensions(&self.head) {
            Err(e) if beyond && format == Format::Webp => format
                .dimensions(&without_metadata_flags(&self.head))
                .map_err(|_| e),
            read => read,
        };
        match read {
            Ok((width, height)) => {
                self.dimensions = Some((width, height));
                if let Err(refusal) = check_dimensions(width, height) {
                    self.refuse(refusal);
                }
                self.head = Vec::new();
            }
            Err(e) if beyond || finished => {
                let within = if beyond {
                    format!(" within its first {HEAD_CAP} bytes")
                } else {
                    String::new()
                };
                self.refuse(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "corrupt_image",
                    format!("the {} header cannot be read{within}: {e}", format.mime()),
                ));
            }
            Err(_) => self.next_try = (2 * self.head.len()).clamp(FIRST_TRY, HEAD_CAP),
        }
    }

    fn refuse(&mut self, refusal: Refusal) {
        self.refusal = Some(refusal);
        self.head = Vec::new();
    }

    /// Bytes held for the checks, whatever the upload's size.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.head.capacity() + self.start.capacity() + self.tail.capacity()
    }
}

/// Keeps the last `n` bytes of what `kept` and `bytes` hold together.
fn keep_last(kept: &mut Vec<u8>, bytes: &[u8], n: usize) {
    if bytes.len() >= n {
        kept.clear();
        kept.extend_from_slice(&bytes[bytes.len() - n..]);
    } else {
        kept.extend_from_slice(bytes);
        let excess = kept.len().saturating_sub(n);
        kept.drain(..excess);
    }
}

/// A VP8X WebP's start with its EXIF and XMP flags cleared: those chunks
/// follow the image data, out of a head's reach (see [`HEAD_CAP`]).
fn without_metadata_flags(head: &[u8]) -> Vec<u8> {
    const FLAGS: usize = 20;
    const EXIF_AND_XMP: u8 = 0b0000_1100;
    let mut head = head.to_vec();
    if head.len() > FLAGS && &head[12..16] == b"VP8X" {
        head[FLAGS] &= !EXIF_AND_XMP;
    }
    head
}

fn check_dimensions(width: u32, height: u32) -> Result<(), Refusal> {
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
    Ok(())
}

fn not_an_image() -> Refusal {
    Refusal::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_image_type",
        "the file is not a JPEG, PNG or WebP image",
    )
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

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/../streamer/tests/fixtures/images/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// Noise, which no encoder shrinks: `3 * width * height` bytes or so.
    fn noise(width: u32, height: u32) -> Vec<u8> {
        let mut state = 0x9E37_79B9_u32;
        (0..width * height * 3)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect()
    }

    fn noise_png(width: u32, height: u32) -> Vec<u8> {
        use image::codecs::png::{CompressionType, FilterType, PngEncoder};
        let mut out = Vec::new();
        image::ImageEncoder::write_image(
            PngEncoder::new_with_quality(
                &mut out,
                CompressionType::Uncompressed,
                FilterType::NoFilter,
            ),
            &noise(width, height),
            width,
            height,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        out
    }

    /// A lossless WebP in the extended layout (VP8X), its EXIF flag set and,
    /// when `exif`, an EXIF chunk after the image data, as the spec orders.
    fn extended_webp(width: u32, height: u32, exif: bool) -> Vec<u8> {
        let mut simple = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut simple)
            .encode(
                &noise(width, height),
                width,
                height,
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        assert_eq!(
            &simple[12..16],
            b"VP8L",
            "the encoder wrote the simple layout"
        );
        let mut body = b"WEBP".to_vec();
        body.extend_from_slice(b"VP8X");
        body.extend_from_slice(&10u32.to_le_bytes());
        body.extend_from_slice(&[0b0000_1000, 0, 0, 0]);
        body.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
        body.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
        body.extend_from_slice(&simple[12..]);
        if exif {
            body.extend_from_slice(b"EXIF");
            body.extend_from_slice(&8u32.to_le_bytes());
            body.extend_from_slice(b"II*\0\x08\0\0\0");
        }
        let mut file = b"RIFF".to_vec();
        file.extend_from_slice(&(body.len() as u32).to_le_bytes());
        file.extend_from_slice(&body);
        file
    }

    /// The verdict on `bytes` fed in pieces of `piece` bytes, and the most
    /// the inspector held meanwhile.
    fn fed_in(bytes: &[u8], piece: usize) -> (Result<Inspected, Refusal>, usize) {
        let mut inspector = Inspector::new();
        let mut most = inspector.kept();
        for piece in bytes.chunks(piece) {
            if let Err(refusal) = inspector.feed(piece) {
                return (Err(refusal), most);
            }
            most = most.max(inspector.kept());
        }
        (inspector.finish(), most)
    }

    fn verdict(result: &Result<Inspected, Refusal>) -> Result<(Format, u32, u32), &'static str> {
        result
            .as_ref()
            .map(|i| (i.format, i.width, i.height))
            .map_err(|r| r.code)
    }

    #[test]
    fn fed_in_any_pieces_the_checks_give_the_verdicts_of_the_whole_file() {
        let coffee = fixture("coffee.jpg");
        let chelsea = fixture("chelsea.png");
        let dimensions = |bytes: &[u8]| {
            image::ImageReader::new(Cursor::new(bytes))
                .with_guessed_format()
                .unwrap()
                .into_dimensions()
                .unwrap()
        };
        let (cw, ch) = dimensions(&coffee);
        let (pw, ph) = dimensions(&chelsea);
        let webp = extended_webp(40, 30, true);
        type Case = (
            &'static str,
            Vec<u8>,
            Result<(Format, u32, u32), &'static str>,
        );
        let cases: Vec<Case> = vec![
            ("a JPEG photo", coffee.clone(), Ok((Format::Jpeg, cw, ch))),
            ("a PNG photo", chelsea.clone(), Ok((Format::Png, pw, ph))),
            ("an extended WebP", webp.clone(), Ok((Format::Webp, 40, 30))),
            (
                "half a JPEG",
                coffee[..coffee.len() / 2].to_vec(),
                Err("truncated_image"),
            ),
            (
                "a WebP without its end",
                webp[..webp.len() - 4].to_vec(),
                Err("truncated_image"),
            ),
            (
                "a PNG cut in its header",
                chelsea[..20].to_vec(),
                Err("corrupt_image"),
            ),
            (
                "a JPEG of 5 bytes",
                b"\xFF\xD8\xFF\xE0\x00".to_vec(),
                Err("corrupt_image"),
            ),
            (
                "4 bytes of PNG magic",
                b"\x89PNG".to_vec(),
                Err("unsupported_image_type"),
            ),
            (
                "a GIF",
                b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
                Err("unsupported_image_type"),
            ),
            ("nothing", Vec::new(), Err("empty_upload")),
            (
                "a WebP flagging EXIF it lacks",
                extended_webp(40, 30, false),
                Err("corrupt_image"),
            ),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(verdict(&inspect(&bytes)), want, "{what}, whole");
            for piece in [1, 5, 13, 4096, 65_536] {
                assert_eq!(
                    verdict(&fed_in(&bytes, piece).0),
                    want,
                    "{what}, in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn a_large_image_is_checked_from_its_header_and_a_few_bytes() {
        let image = noise_png(1200, 1000);
        assert!(image.len() > 3_000_000);
        let (result, most) = fed_in(&image, 64 * 1024);
        assert_eq!(verdict(&result), Ok((Format::Png, 1200, 1000)));
        assert!(
            most <= 64 * 1024 + 1024,
            "held {most} bytes of {}",
            image.len()
        );
        let (result, _) = fed_in(&image[..image.len() - 1], 64 * 1024);
        assert_eq!(verdict(&result), Err("truncated_image"));
    }

    #[test]
    fn a_header_not_within_the_first_mib_is_corrupt_and_no_more_is_held() {
        // Comment segments (FF FE, 64 KiB each) pushing the frame header
        // past the cap; the rest is a real photo.
        let photo = fixture("coffee.jpg");
        let mut jpeg = photo[..2].to_vec();
        while jpeg.len() <= HEAD_CAP {
            jpeg.extend_from_slice(&[0xFF, 0xFE, 0xFF, 0xFF]);
            jpeg.extend(std::iter::repeat_n(b'c', 0xFFFF - 2));
        }
        jpeg.extend_from_slice(&photo[2..]);
        let (result, most) = fed_in(&jpeg, 100_000);
        let refusal = result.unwrap_err();
        assert_eq!(refusal.code, "corrupt_image", "{}", refusal.message);
        assert!(refusal.message.contains("first"), "{}", refusal.message);
        assert!(most <= HEAD_CAP + 1024, "held {most} bytes");
    }

    #[test]
    fn an_extended_webp_whose_metadata_is_past_the_first_mib_passes() {
        let webp = extended_webp(700, 700, true);
        assert!(webp.len() > HEAD_CAP + 100_000, "{} bytes", webp.len());
        for piece in [65_536, usize::MAX] {
            let (result, _) = fed_in(&webp, piece);
            assert_eq!(
                verdict(&result),
                Ok((Format::Webp, 700, 700)),
                "pieces of {piece}"
            );
        }
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
