//! Object keys as S3 notifications carry them.

use percent_encoding::percent_decode_str;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key {raw:?} has a '%' that is not followed by two hex digits")]
    BadEscape { raw: String },
    #[error("key {raw:?} does not decode to UTF-8")]
    NotUtf8 { raw: String },
    #[error("key is empty")]
    Empty,
}

/// Decodes a key from an S3 event notification.
///
/// S3 form-encodes keys in notifications: a space arrives as `+`, a `+` as `%2B`, and anything
/// else outside a safe set as `%XX` bytes of UTF-8 (`/` may or may not be encoded). So `+` becomes a
/// space first, then the percent escapes are decoded. EventBridge events carry the key raw and
/// must not go through this.
pub fn decode_key(raw: &str) -> Result<String, KeyError> {
    // S3 always escapes '%' itself, so a '%' without two hex digits means the event was not
    // produced by S3 (or was mangled); decoding it leniently would launch a job for a key that
    // does not exist.
    let bytes = raw.as_bytes();
    let bad_escape = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return Err(KeyError::BadEscape { raw: raw.into() });
    }
    let spaced = raw.replace('+', " ");
    let key = percent_decode_str(&spaced)
        .decode_utf8()
        .map_err(|_| KeyError::NotUtf8 { raw: raw.into() })?
        .into_owned();
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_table() {
        let table = [
            ("plain.csv", "plain.csv"),
            ("test%2Fkey", "test/key"),
            ("in/data.csv", "in/data.csv"),
            ("my+file.csv", "my file.csv"),
            ("a%2Bb.csv", "a+b.csv"),
            ("a%2B+b.csv", "a+ b.csv"),
            ("2024-01-01T00%3A00%3A00.csv", "2024-01-01T00:00:00.csv"),
            ("caf%C3%A9.csv", "café.csv"),
            ("%E5%90%8D%E5%89%8D.txt", "名前.txt"),
            ("%F0%9F%98%80", "😀"),
            ("100%25.txt", "100%.txt"),
            ("%2525", "%25"),
            ("a%26b%3Dc%3Fd", "a&b=c?d"),
            ("quote%27s+%22dq%22", "quote's \"dq\""),
            ("%24%28touch+x%29", "$(touch x)"),
            ("line%0Abreak", "line\nbreak"),
            ("analysis%2Fout.csv", "analysis/out.csv"),
            ("lower%c3%a9", "loweré"),
        ];
        for (raw, decoded) in table {
            assert_eq!(decode_key(raw).as_deref(), Ok(decoded), "{raw}");
        }
    }

    #[test]
    fn undecodable_keys_are_errors_that_quote_the_key() {
        assert_eq!(
            decode_key("bad%C3.csv"),
            Err(KeyError::NotUtf8 {
                raw: "bad%C3.csv".into()
            })
        );
        assert_eq!(
            decode_key("%FF"),
            Err(KeyError::NotUtf8 { raw: "%FF".into() })
        );
        for raw in ["100%.txt", "a%2", "%zz", "%"] {
            let err = decode_key(raw).unwrap_err();
            assert_eq!(err, KeyError::BadEscape { raw: raw.into() });
            assert!(err.to_string().contains(&format!("{raw:?}")));
        }
        assert_eq!(decode_key(""), Err(KeyError::Empty));
    }
}
