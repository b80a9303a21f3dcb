//! Private helpers for bounds-checked big-endian reading and writing.

use crate::proto::consts::MAX_STRING_LEN;
use crate::proto::error::{DecodeError, EncodeError};

/// A cursor over a byte slice; every read is bounds-checked and returns
/// `None` when not enough bytes remain.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.rest
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.rest.split_first_chunk::<N>()?;
        self.rest = tail;
        Some(*head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array::<2>().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array::<4>().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array::<8>().map(u64::from_be_bytes)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    /// Reads `n` bytes where `n` comes from a 32-bit length field.
    pub(crate) fn bytes_u32(&mut self, n: u32) -> Option<&'a [u8]> {
        self.bytes(usize::try_from(n).ok()?)
    }
}

/// Checks that `buf` holds at least `need` bytes.
pub(crate) fn need(buf: &[u8], need: usize) -> Result<(), DecodeError> {
    if buf.len() < need {
        Err(DecodeError::Truncated {
            need,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Decodes a protocol string: UTF-8, no NUL, at most [`MAX_STRING_LEN`].
pub(crate) fn decode_string(bytes: &[u8], what: &'static str) -> Result<String, DecodeError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(DecodeError::TooLong {
            what,
            len: len_u64(bytes.len()),
            max: len_u64(MAX_STRING_LEN),
        });
    }
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { what })?;
    if s.contains('\0') {
        return Err(DecodeError::ContainsNul { what });
    }
    Ok(s.to_owned())
}

/// Checks a string the caller wants to encode against the protocol rules.
pub(crate) fn check_string(s: &str, what: &'static str) -> Result<(), EncodeError> {
    if s.len() > MAX_STRING_LEN {
        return Err(EncodeError::TooLong {
            what,
            len: len_u64(s.len()),
            max: len_u64(MAX_STRING_LEN),
        });
    }
    if s.contains('\0') {
        return Err(EncodeError::Invalid("string contains a NUL character"));
    }
    Ok(())
}

/// Truncates a free-form message to at most `max` bytes on a character
/// boundary, dropping NUL characters (which the spec forbids in strings).
pub(crate) fn sanitize_message(msg: &str, max: usize) -> String {
    let mut out = String::new();
    for c in msg.chars().filter(|&c| c != '\0') {
        let Some(new_len) = out.len().checked_add(c.len_utf8()) else {
            break;
        };
        if new_len > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Lossless `usize` to `u64` conversion (saturating on exotic platforms).
pub(crate) fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Converts a length to `u32`, failing with [`EncodeError::TooLong`].
pub(crate) fn len_u32(n: usize, what: &'static str) -> Result<u32, EncodeError> {
    u32::try_from(n).map_err(|_| EncodeError::TooLong {
        what,
        len: len_u64(n),
        max: u64::from(u32::MAX),
    })
}

/// Adds lengths, failing with [`EncodeError::TooLong`] on overflow.
pub(crate) fn add_len(a: usize, b: usize, what: &'static str) -> Result<usize, EncodeError> {
    a.checked_add(b).ok_or(EncodeError::TooLong {
        what,
        len: u64::MAX,
        max: len_u64(usize::MAX),
    })
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_bounds() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u32(), Some(2));
        assert_eq!(r.u16(), None);
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.bytes(2), None);
        assert_eq!(r.bytes(1), Some(&[9u8][..]));
        assert!(r.is_empty());
        assert_eq!(r.u64(), None);
        assert_eq!(r.bytes_u32(u32::MAX), None);
    }

    #[test]
    fn strings() {
        assert_eq!(decode_string(b"abc", "s"), Ok("abc".to_owned()));
        assert_eq!(
            decode_string(&[0xff], "s"),
            Err(DecodeError::InvalidUtf8 { what: "s" })
        );
        assert_eq!(
            decode_string(b"a\0b", "s"),
            Err(DecodeError::ContainsNul { what: "s" })
        );
        assert!(matches!(
            decode_string(&[b'a'; MAX_STRING_LEN + 1], "s"),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(decode_string(&[b'a'; MAX_STRING_LEN], "s").is_ok());
        assert!(check_string("a\0", "s").is_err());
        assert!(check_string(&"a".repeat(MAX_STRING_LEN + 1), "s").is_err());
    }

    #[test]
    fn sanitize() {
        assert_eq!(sanitize_message("héllo", 2), "h");
        assert_eq!(sanitize_message("héllo", 3), "hé");
        assert_eq!(sanitize_message("a\0b", 10), "ab");
        assert_eq!(sanitize_message("", 10), "");
    }
}
