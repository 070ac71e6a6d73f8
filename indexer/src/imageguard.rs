//! Checks an image file before decoding it: is it an image at all, is it complete, and is
//! it small enough to decode. A header claiming 50,000 × 50,000 pixels is refused here,
//! before a decoder allocates gigabytes.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest image accepted, in pixels (100 megapixels; larger files are refused by header).
pub const MAX_PIXELS: u64 = 100_000_000;
/// Largest side accepted, in pixels.
pub const MAX_SIDE: u32 = 30_000;

/// Image container formats the indexer decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JPEG (decodable at 1/2, 1/4, 1/8 scale).
    Jpeg,
    /// PNG.
    Png,
    /// WebP.
    Webp,
    /// BMP.
    Bmp,
    /// TIFF.
    Tiff,
}

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Container format.
    pub format: Format,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Why an image is refused before decoding.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Zero bytes.
    #[error("empty file")]
    Empty,
    /// The content is not an image format we decode.
    #[error("not an image (unrecognised content)")]
    NotAnImage,
    /// The header cannot be read.
    #[error("unreadable {0:?} header")]
    BadHeader(Format),
    /// The header claims a size we refuse to decode.
    #[error("header claims {width}x{height} pixels, above the {max} pixel limit")]
    TooLarge {
        /// Claimed width.
        width: u32,
        /// Claimed height.
        height: u32,
        /// The limit.
        max: u64,
    },
    /// The header claims a zero size.
    #[error("header claims an empty image ({width}x{height})")]
    ZeroSize {
        /// Claimed width.
        width: u32,
        /// Claimed height.
        height: u32,
    },
    /// The image is too thin to hold a feature (a line, not a picture).
    #[error("image is {width}x{height}: at least 8 pixels per side and an aspect ratio under 64:1 are needed")]
    Degenerate {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// The file ends before the image data does.
    #[error("truncated {0:?} data (no end marker)")]
    Truncated(Format),
}

/// Recognises the container format from the first bytes.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    match bytes {
        [0xFF, 0xD8, 0xFF, ..] => Some(Format::Jpeg),
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(Format::Png),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some(Format::Webp),
        [b'B', b'M', ..] => Some(Format::Bmp),
        [b'I', b'I', 42, 0, ..] | [b'M', b'M', 0, 42, ..] => Some(Format::Tiff),
        _ => None,
    }
}

/// Reads the header (format and size) without decoding, refusing bombs.
pub fn header(bytes: &[u8]) -> Result<Header, Refusal> {
    if bytes.is_empty() {
        return Err(Refusal::Empty);
    }
    let format = sniff(bytes).ok_or(Refusal::NotAnImage)?;
    let size = imagesize::blob_size(bytes).map_err(|_| Refusal::BadHeader(format))?;
    let (width, height) = (size.width as u64, size.height as u64);
    if width == 0 || height == 0 {
        return Err(Refusal::ZeroSize {
            width: width as u32,
            height: height as u32,
        });
    }
    if width * height > MAX_PIXELS || width > MAX_SIDE as u64 || height > MAX_SIDE as u64 {
        return Err(Refusal::TooLarge {
            width: width.min(u32::MAX as u64) as u32,
            height: height.min(u32::MAX as u64) as u32,
            max: MAX_PIXELS,
        });
    }
    let (short, long) = (width.min(height), width.max(height));
    if short < 8 || long > short * 64 {
        return Err(Refusal::Degenerate {
            width: width as u32,
            height: height as u32,
        });
    }
    Ok(Header {
        format,
        width: width as u32,
        height: height as u32,
    })
}

/// Whether the data ends like a complete file of its format (JPEG end-of-image marker,
/// PNG `IEND` chunk). Formats without a cheap check pass.
pub fn looks_complete(format: Format, bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    match format {
        Format::Jpeg => tail.windows(2).any(|w| w == [0xFF, 0xD9]),
        Format::Png => tail.windows(4).any(|w| w == b"IEND"),
        _ => true,
    }
}

/// Full pre-decode check: header, size limit and completeness.
pub fn check(bytes: &[u8]) -> Result<Header, Refusal> {
    let h = header(bytes)?;
    if !looks_complete(h.format, bytes) {
        return Err(Refusal::Truncated(h.format));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_header(width: u16, height: u16) -> Vec<u8> {
        // SOI, APP0 JFIF, SOF0 with the size, then EOI.
        let mut v = vec![
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0,
            0,
        ];
        v.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        v.extend_from_slice(&height.to_be_bytes());
        v.extend_from_slice(&width.to_be_bytes());
        v.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        v.extend_from_slice(&[0xFF, 0xD9]);
        v
    }

    #[test]
    fn refuses_a_decompression_bomb_by_header() {
        let bomb = jpeg_header(50_000, 50_000);
        assert!(matches!(
            check(&bomb),
            Err(Refusal::TooLarge {
                width: 50_000,
                height: 50_000,
                ..
            })
        ));
        let thin = check(&jpeg_header(1, 30_000));
        assert!(
            matches!(
                thin,
                Err(Refusal::Degenerate {
                    width: 1,
                    height: 30_000
                })
            ),
            "{thin:?}"
        );
        assert!(matches!(
            check(&jpeg_header(4, 4)),
            Err(Refusal::Degenerate { .. })
        ));
        let ok = jpeg_header(640, 480);
        assert_eq!(
            check(&ok),
            Ok(Header {
                format: Format::Jpeg,
                width: 640,
                height: 480
            })
        );
    }

    #[test]
    fn refuses_empty_text_and_truncated() {
        assert_eq!(check(b""), Err(Refusal::Empty));
        assert_eq!(
            check(b"hello, I am a text file named photo.jpg"),
            Err(Refusal::NotAnImage)
        );
        let mut cut = jpeg_header(640, 480);
        cut.truncate(cut.len() - 2);
        assert_eq!(check(&cut), Err(Refusal::Truncated(Format::Jpeg)));
        assert!(matches!(
            check(&[0xFF, 0xD8, 0xFF, 0xE0]),
            Err(Refusal::BadHeader(Format::Jpeg))
        ));
    }

    #[test]
    fn sniffs_formats() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some(Format::Png));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Format::Webp));
        assert_eq!(sniff(b"II*\0"), Some(Format::Tiff));
        assert_eq!(sniff(b"GIF89a"), None);
    }
}
