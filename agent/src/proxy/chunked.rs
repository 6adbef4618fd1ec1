//! Sans-IO decoder for the chunked transfer coding (RFC 9112 §7.1).
//!
//! The proxy forwards chunks unchanged (and the trailer section without hop-by-hop
//! fields); it decodes to know exactly where a body ends, so that the next message on
//! the same connection starts at the right byte, and where its trailers begin.
//! The decoder is strict (CRLF only; extensions and trailer fields bounded and held to
//! their grammar, so a quoted string ends on its line and a trailer line is a field, not a
//! status line): a lenient parser that finds a different end than the next hop is how
//! request smuggling happens, and what it forwards unchanged must read the same to every
//! parser after it.

use std::ops::Range;

/// Longest chunk extension accepted on one size line.
pub const MAX_EXTENSION_LEN: usize = 4096;
/// Largest trailer section accepted.
pub const MAX_TRAILERS_LEN: usize = 16 * 1024;
/// Most hex digits in a chunk size (a `u64`).
const MAX_SIZE_DIGITS: u8 = 16;

/// Why a chunked body is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    /// The chunk size is not hexadecimal or is too long.
    #[error("invalid chunk size")]
    BadSize,
    /// A chunk extension is malformed or longer than [`MAX_EXTENSION_LEN`].
    #[error("invalid chunk extension")]
    BadExtension,
    /// A line did not end with CRLF where one was required.
    #[error("missing CRLF in chunked body")]
    MissingCrlf,
    /// The trailer section is malformed or longer than [`MAX_TRAILERS_LEN`].
    #[error("invalid chunked trailer section")]
    BadTrailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size {
        digits: u8,
        value: u64,
    },
    Extension {
        value: u64,
        len: usize,
        at: Ext,
    },
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// In a trailer field's name; `len` bytes of it so far (0: the line's start).
    TrailerName {
        len: usize,
    },
    /// After a trailer field's colon.
    TrailerValue,
    TrailerLf {
        empty: bool,
    },
    Done,
}

/// Where a chunk extension's bytes are (RFC 9112 §7.1.1): `*( BWS ";" BWS name
/// [ BWS "=" BWS ( token / quoted-string ) ] )`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    /// Whitespace after the size: a `;` must follow.
    AfterSize,
    /// After a `;`, before the name.
    BeforeName,
    /// In the name.
    Name,
    /// Whitespace after the name.
    AfterName,
    /// After `=`, before the value.
    BeforeValue,
    /// In a token value.
    Token,
    /// In a quoted-string value.
    Quoted,
    /// After a backslash in a quoted string.
    Escaped,
    /// After a value (whitespace, or the closing quote).
    AfterValue,
}

impl Ext {
    /// Whether the size line may end here.
    fn may_end(self) -> bool {
        matches!(
            self,
            Ext::Name | Ext::AfterName | Ext::Token | Ext::AfterValue
        )
    }

    /// The state after byte `b` (not CR), or `None` if `b` cannot come here.
    fn next(self, b: u8) -> Option<Ext> {
        let ws = b == b' ' || b == b'\t';
        let tchar = is_tchar(b);
        Some(match self {
            Ext::AfterSize if ws => Ext::AfterSize,
            Ext::AfterSize | Ext::AfterName | Ext::AfterValue | Ext::Name | Ext::Token
                if b == b';' =>
            {
                Ext::BeforeName
            }
            Ext::BeforeName if ws => Ext::BeforeName,
            Ext::BeforeName | Ext::Name if tchar => Ext::Name,
            Ext::Name | Ext::AfterName if ws => Ext::AfterName,
            Ext::Name | Ext::AfterName if b == b'=' => Ext::BeforeValue,
            Ext::BeforeValue if ws => Ext::BeforeValue,
            Ext::BeforeValue if b == b'"' => Ext::Quoted,
            Ext::BeforeValue | Ext::Token if tchar => Ext::Token,
            Ext::Token | Ext::AfterValue if ws => Ext::AfterValue,
            Ext::Quoted if b == b'"' => Ext::AfterValue,
            Ext::Quoted if b == b'\\' => Ext::Escaped,
            Ext::Quoted | Ext::Escaped if ws || is_vchar_or_obs(b) => Ext::Quoted,
            _ => return None,
        })
    }
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A visible character or obs-text, as field values and quoted strings may hold.
fn is_vchar_or_obs(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Result of one [`ChunkedDecoder::feed`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input that belong to the body and were consumed.
    pub consumed: usize,
    /// Range of the input holding chunk payload, if this step reached some (empty if not).
    pub data: Range<usize>,
}

/// Incremental chunked-body decoder; feed it bytes in any split.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size {
                digits: 0,
                value: 0,
            },
            trailers: 0,
        }
    }

    /// Whether the whole body, trailer section included, has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the last chunk has been consumed and the trailer section (its final empty
    /// line included) is what comes next.
    pub fn in_trailers(&self) -> bool {
        matches!(
            self.state,
            State::TrailerName { .. } | State::TrailerValue | State::TrailerLf { .. }
        )
    }

    /// Consumes body bytes from the start of `input`. Returns as soon as it reaches chunk
    /// payload (so the caller can use it), the trailer section (so the caller can hold it
    /// apart), the end of the body, or the end of the input.
    /// Bytes after the body are never consumed. Call again with the rest of the input until
    /// `consumed` is zero or the body is done.
    pub fn feed(&mut self, input: &[u8]) -> Result<Step, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            if let State::Data { remaining } = self.state {
                let n = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                // n <= remaining, so the subtraction cannot underflow.
                let left = remaining - n as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { remaining: left }
                };
                return Ok(Step {
                    consumed: i + n,
                    data: i..i + n,
                });
            }
            if self.state == State::Done {
                break;
            }
            let was_trailers = self.in_trailers();
            self.byte(input[i])?;
            i += 1;
            if !was_trailers && self.in_trailers() {
                break;
            }
        }
        Ok(Step {
            consumed: i,
            data: i..i,
        })
    }

    /// Counts one more byte of the trailer section, which then goes on in `next`.
    fn trailer(&mut self, next: State) -> Result<State, ChunkedError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS_LEN {
            return Err(ChunkedError::BadTrailers);
        }
        Ok(next)
    }

    fn byte(&mut self, b: u8) -> Result<(), ChunkedError> {
        self.state = match self.state {
            State::Size { digits, value } => match (b as char).to_digit(16) {
                Some(d) => {
                    if digits >= MAX_SIZE_DIGITS {
                        return Err(ChunkedError::BadSize);
                    }
                    State::Size {
                        digits: digits + 1,
                        value: (value << 4) | u64::from(d),
                    }
                }
                None if digits == 0 => return Err(ChunkedError::BadSize),
                None if b == b'\r' => State::SizeLf { value },
                None if b == b';' => State::Extension {
                    value,
                    len: 1,
                    at: Ext::BeforeName,
                },
                None if b == b' ' || b == b'\t' => State::Extension {
                    value,
                    len: 1,
                    at: Ext::AfterSize,
                },
                None => return Err(ChunkedError::BadSize),
            },
            State::Extension { value, len, at } => {
                if b == b'\r' {
                    // Whitespace after the size is only allowed before an extension, and
                    // a quoted string does not run past its line.
                    if !at.may_end() {
                        return Err(ChunkedError::BadExtension);
                    }
                    self.state = State::SizeLf { value };
                    return Ok(());
                }
                if len >= MAX_EXTENSION_LEN {
                    return Err(ChunkedError::BadExtension);
                }
                State::Extension {
                    value,
                    len: len + 1,
                    at: at.next(b).ok_or(ChunkedError::BadExtension)?,
                }
            }
            State::SizeLf { value } => {
                if b != b'\n' {
                    return Err(ChunkedError::MissingCrlf);
                }
                if value == 0 {
                    State::TrailerName { len: 0 }
                } else {
                    State::Data { remaining: value }
                }
            }
            State::Data { .. } | State::Done => return Ok(()),
            State::DataCr if b == b'\r' => State::DataLf,
            State::DataLf if b == b'\n' => State::Size {
                digits: 0,
                value: 0,
            },
            State::DataCr | State::DataLf => return Err(ChunkedError::MissingCrlf),
            // A trailer line is a field (RFC 9110 §5.1): a token, a colon, a value of
            // visible characters and whitespace. Anything else (a status line, a folded
            // line, a name with spaces) could be read as something else further on.
            State::TrailerName { len: 0 } if b == b'\r' => State::TrailerLf { empty: true },
            State::TrailerName { len } if len > 0 && b == b':' => {
                self.trailer(State::TrailerValue)?
            }
            State::TrailerName { len } if is_tchar(b) => {
                self.trailer(State::TrailerName { len: len + 1 })?
            }
            State::TrailerName { .. } => return Err(ChunkedError::BadTrailers),
            State::TrailerValue if b == b'\r' => State::TrailerLf { empty: false },
            State::TrailerValue if b == b' ' || b == b'\t' || is_vchar_or_obs(b) => {
                self.trailer(State::TrailerValue)?
            }
            State::TrailerValue => return Err(ChunkedError::BadTrailers),
            State::TrailerLf { empty } => {
                if b != b'\n' {
                    return Err(ChunkedError::MissingCrlf);
                }
                if empty {
                    State::Done
                } else {
                    State::TrailerName { len: 0 }
                }
            }
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `pieces` in order; returns (payload, body length consumed, done).
    fn run(pieces: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), ChunkedError> {
        let mut dec = ChunkedDecoder::new();
        let mut payload = Vec::new();
        let mut total = 0;
        for piece in pieces {
            let mut rest: &[u8] = piece;
            loop {
                let step = dec.feed(rest)?;
                payload.extend_from_slice(&rest[step.data.clone()]);
                total += step.consumed;
                rest = &rest[step.consumed..];
                if step.consumed == 0 || dec.is_done() || rest.is_empty() {
                    break;
                }
            }
            if dec.is_done() {
                break;
            }
        }
        Ok((payload, total, dec.is_done()))
    }

    fn encode(payload: &[u8], sizes: &[usize], ext: bool, trailers: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = payload;
        let mut sizes = sizes.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
            out.extend_from_slice(format!("{n:x}").as_bytes());
            if ext {
                out.extend_from_slice(b" ; name=\"v a\"");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        out.extend_from_slice(b"0\r\n");
        if trailers {
            out.extend_from_slice(b"X-Sum: 1\r\nX-Other: two\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn decodes_simple_body_and_stops_at_its_end() {
        let body = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: v\r\n\r\nGET /next";
        let (payload, len, done) = run(&[body]).unwrap();
        assert_eq!(payload, b"hello world");
        assert!(done);
        assert_eq!(&body[len..], b"GET /next");
    }

    #[test]
    fn rejects_malformed_bodies() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5;\x01\r\n",
            b"11111111111111111\r\n",
            b"0\r\nBad\x00Trailer\r\n\r\n",
            b"0\r\n\n",
            b"-1\r\n",
            // A quoted string does not end its line's grammar, nor run past it.
            b"1;a=\"x\r\nZ\r\n0\r\n\r\n",
            b"1;a=\"x\\\r\nZ\r\n0\r\n\r\n",
            b"1;a=\"x\"y\r\nZ\r\n0\r\n\r\n",
            b"1;=v\r\nZ\r\n0\r\n\r\n",
            b"1;a=\r\nZ\r\n0\r\n\r\n",
            b"1;a b\r\nZ\r\n0\r\n\r\n",
            b"1;a=b c\r\nZ\r\n0\r\n\r\n",
            b"1;a@b\r\nZ\r\n0\r\n\r\n",
            // Trailer lines that are not fields: a response a lenient client would read
            // as the next one, a folded line, a line with no colon, an empty name.
            b"0\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            b"0\r\nX: a\r\n  folded\r\n\r\n",
            b"0\r\nNoColon\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\nX : v\r\n\r\n",
            b"0\r\nX: a\x01b\r\n\r\n",
        ] {
            assert!(
                run(&[bad]).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long_ext = b"1;".to_vec();
        long_ext.resize(MAX_EXTENSION_LEN + 10, b'a');
        assert_eq!(run(&[&long_ext]), Err(ChunkedError::BadExtension));
        let mut long_trailer = b"0\r\nX: ".to_vec();
        long_trailer.resize(MAX_TRAILERS_LEN + 10, b'a');
        assert_eq!(run(&[&long_trailer]), Err(ChunkedError::BadTrailers));
    }

    /// What the grammar allows: whitespace around `;` and `=`, several extensions, names
    /// alone, token and quoted values with escapes and obs-text, empty trailer values.
    #[test]
    fn accepts_extensions_and_trailers_as_the_grammar_has_them() {
        let body: &[u8] = b"1 ; a ; b = c;d=\"q \\\" ;\xe9\" ; e\r\nZ\r\n\
                            2;x=y;z\r\nZZ\r\n0;last\r\nX-Empty:\r\nX-Sum:\t1 2\r\n\r\n";
        let (payload, len, done) = run(&[body]).unwrap();
        assert_eq!(
            (payload.as_slice(), len, done),
            (&b"ZZZ"[..], body.len(), true)
        );
    }

    #[test]
    fn huge_chunk_sizes_do_not_overflow() {
        let mut dec = ChunkedDecoder::new();
        let step = dec.feed(b"ffffffffffffffff\r\nabc").unwrap();
        assert_eq!((step.consumed, step.data), (21, 18..21));
        let step = dec.feed(b"abc").unwrap();
        assert_eq!(step.data, 0..3);
        assert!(!dec.is_done());
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_payload_and_end(
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
            sizes in proptest::collection::vec(1usize..700, 1..8),
            ext in any::<bool>(),
            trailers in any::<bool>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut encoded = encode(&payload, &sizes, ext, trailers);
            let body_len = encoded.len();
            encoded.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(encoded.len() + 1)).collect();
            points.push(0);
            points.push(encoded.len());
            points.sort_unstable();
            let pieces: Vec<&[u8]> = points.windows(2).map(|w| &encoded[w[0]..w[1]]).collect();
            let (got, len, done) = run(&pieces).unwrap();
            prop_assert!(done);
            prop_assert_eq!(len, body_len);
            prop_assert_eq!(got, payload);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = run(&[&data]);
        }
    }
}
