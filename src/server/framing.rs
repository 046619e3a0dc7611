//! Follows the framing of an HTTP/1.1 request stream, byte by byte as it is
//! read, to find request smuggling shapes that hyper resolves silently before
//! a service could see them (SPEC §3 row 16): a `Content-Length` beside a
//! `Transfer-Encoding`, or two `Content-Length`s, in ANY request of the
//! connection: the first, one pipelined behind it in the same segment, or
//! one sent while another is in flight.
//!
//! Every head is scanned (leading empty lines before a request line are
//! skipped, as servers do); every body is skipped by its own framing
//! (`Content-Length` bytes, or chunks to the last chunk and its trailers),
//! so that the next head is found where hyper will find it. Only header
//! names are looked at byte by byte; the rest of each line is skipped with
//! `memchr`, so this costs little: a few hundred bytes a request.
//!
//! What it cannot follow (an unreadable `Content-Length`, a bad chunk size)
//! hyper refuses and closes the connection on; the scanner stops there.

/// The h2 connection preface: such a connection is not scanned.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Where the scanner is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Before the first byte: is this HTTP/1 at all?
    #[default]
    Start,
    /// In a request head.
    Head,
    /// In a body with this many bytes left.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping a chunk extension up to its line end.
    ChunkExt,
    /// In chunk data with this many bytes left.
    ChunkData(u64),
    /// After chunk data, up to its line end.
    ChunkDataEnd,
    /// In the trailer section after the last chunk.
    Trailer,
    /// Not following any more (h2, or a stream hyper refuses).
    Off,
}

/// The framing headers of the head being read.
#[derive(Debug, Default)]
struct Head {
    /// A request line was seen (empty lines before it are skipped).
    started: bool,
    name: [u8; 18],
    name_len: usize,
    in_name: bool,
    /// In a `content-length` value.
    in_length: bool,
    line_len: usize,
    content_lengths: u8,
    length: Option<u64>,
    length_bad: bool,
    transfer_encoding: bool,
}

/// Follows one connection's request stream.
#[derive(Debug, Default)]
pub struct Framing {
    state: State,
    head: Head,
    /// The first bytes, to tell h2's preface from a request line.
    preface: Vec<u8>,
    chunk: u64,
}

impl Framing {
    /// Scans the next bytes of the stream; true when a head with
    /// conflicting framing was found in them.
    pub fn scan(&mut self, mut bytes: &[u8]) -> bool {
        if self.state == State::Start {
            let want = H2_PREFACE.len() - self.preface.len();
            let take = want.min(bytes.len());
            self.preface.extend_from_slice(&bytes[..take]);
            if !H2_PREFACE.starts_with(&self.preface) {
                self.state = State::Head;
                let seen = std::mem::take(&mut self.preface);
                if self.scan(&seen[..seen.len() - take]) {
                    return true;
                }
            } else if self.preface.len() == H2_PREFACE.len() {
                self.state = State::Off;
                return false;
            } else {
                return false;
            }
        }
        let mut conflict = false;
        while !bytes.is_empty() {
            let used = match self.state {
                State::Start | State::Off => return conflict,
                State::Head => {
                    let (used, found) = self.head_bytes(bytes);
                    conflict |= found;
                    used
                }
                State::Body(left) | State::ChunkData(left) => {
                    let used = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    let left = left - used as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkDataEnd,
                        _ => State::ChunkData(left),
                    };
                    used
                }
                State::ChunkDataEnd => skip_line(bytes, || self.state = State::ChunkSize),
                State::ChunkExt => {
                    let used = skip_line(bytes, || {});
                    if bytes[used - 1] == b'\n' {
                        self.end_chunk_size();
                    }
                    used
                }
                State::ChunkSize => {
                    self.chunk_size_byte(bytes[0]);
                    1
                }
                State::Trailer => self.trailer_bytes(bytes),
            };
            bytes = &bytes[used..];
        }
        conflict
    }

    /// Head bytes: returns how many were used and whether the head ended
    /// with conflicting framing.
    fn head_bytes(&mut self, bytes: &[u8]) -> (usize, bool) {
        let head = &mut self.head;
        let byte = bytes[0];
        if head.in_length {
            match byte {
                b'0'..=b'9' => {
                    let digit = u64::from(byte - b'0');
                    let length = head.length.unwrap_or(0);
                    head.length = length.checked_mul(10).and_then(|l| l.checked_add(digit));
                    head.length_bad |= head.length.is_none();
                }
                b' ' | b'\t' | b'\r' => {}
                b'\n' => {
                    head.in_length = false;
                    return (0, false);
                }
                _ => head.length_bad = true,
            }
            head.line_len += 1;
            return (1, false);
        }
        if head.in_name
            && head.name_len == 0
            && !matches!(
                byte.to_ascii_lowercase(),
                b'c' | b't' | b':' | b'\r' | b'\n'
            )
        {
            // Neither `content-length` nor `transfer-encoding`: the line is
            // skipped whole, like a value.
            head.in_name = false;
        }
        if head.in_name {
            // A run of name bytes in one go.
            let mut used = 0;
            while let Some(&b) = bytes.get(used) {
                if matches!(b, b':' | b'\n' | b'\r') {
                    break;
                }
                used += 1;
                head.line_len += 1;
                if head.name_len < head.name.len() {
                    head.name[head.name_len] = b.to_ascii_lowercase();
                    head.name_len += 1;
                } else {
                    // Longer than any name looked for: skip the line.
                    head.in_name = false;
                    break;
                }
            }
            if used > 0 {
                return (used, false);
            }
        }
        if !head.in_name && byte != b'\n' {
            // The request line or a value: skip to the line's end.
            let end = memchr::memchr(b'\n', bytes).unwrap_or(bytes.len());
            if bytes[..end].iter().any(|&b| b != b'\r') {
                head.line_len += 1;
            }
            return (end, false);
        }
        match byte {
            b'\n' => {
                if head.line_len == 0 {
                    if !head.started {
                        // An empty line before the request line.
                        return (1, false);
                    }
                    return (1, self.end_head());
                }
                head.started = true;
                head.line_len = 0;
                head.name_len = 0;
                head.in_name = true;
            }
            b'\r' => {}
            b':' if head.in_name => {
                let name = &head.name[..head.name_len];
                if name == b"content-length" {
                    head.content_lengths = head.content_lengths.saturating_add(1);
                    head.in_length = true;
                } else if name == b"transfer-encoding" {
                    head.transfer_encoding = true;
                }
                head.in_name = false;
                head.line_len += 1;
            }
            _ => {
                if head.in_name {
                    if head.name_len < head.name.len() {
                        head.name[head.name_len] = byte.to_ascii_lowercase();
                        head.name_len += 1;
                    } else {
                        head.in_name = false;
                    }
                }
                head.line_len += 1;
            }
        }
        (1, false)
    }

    /// A head ended: judge its framing and step into its body.
    fn end_head(&mut self) -> bool {
        let head = std::mem::take(&mut self.head);
        let conflict =
            head.content_lengths > 1 || (head.content_lengths > 0 && head.transfer_encoding);
        self.state = if conflict || head.length_bad {
            // Refused (row 16) or by hyper: the connection closes.
            State::Off
        } else if head.transfer_encoding {
            self.chunk = 0;
            State::ChunkSize
        } else {
            match head.length {
                Some(length) if length > 0 => State::Body(length),
                _ => State::Head,
            }
        };
        conflict
    }

    fn chunk_size_byte(&mut self, byte: u8) {
        let digit = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            b'A'..=b'F' => byte - b'A' + 10,
            b';' => {
                self.state = State::ChunkExt;
                return;
            }
            b'\n' => {
                self.end_chunk_size();
                return;
            }
            b'\r' | b' ' | b'\t' => return,
            _ => {
                self.state = State::Off;
                return;
            }
        };
        match self.chunk.checked_mul(16) {
            Some(size) => self.chunk = size + u64::from(digit),
            None => self.state = State::Off,
        }
    }

    fn end_chunk_size(&mut self) {
        self.state = match std::mem::take(&mut self.chunk) {
            0 => State::Trailer,
            size => State::ChunkData(size),
        };
        self.head.line_len = 0;
    }

    /// Trailer lines up to the empty one that ends the request.
    fn trailer_bytes(&mut self, bytes: &[u8]) -> usize {
        match bytes[0] {
            b'\n' => {
                if self.head.line_len == 0 {
                    self.head = Head::default();
                    self.state = State::Head;
                }
                self.head.line_len = 0;
                1
            }
            b'\r' => 1,
            _ => {
                self.head.line_len += 1;
                let end = memchr::memchr(b'\n', bytes).unwrap_or(bytes.len());
                end.max(1)
            }
        }
    }
}

/// Skips to just past the next line end; calls `done` when it is reached.
fn skip_line(bytes: &[u8], done: impl FnOnce()) -> usize {
    match memchr::memchr(b'\n', bytes) {
        Some(end) => {
            done();
            end + 1
        }
        None => bytes.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::Framing;

    fn conflicting(stream: &str) -> bool {
        Framing::default().scan(stream.as_bytes())
    }

    #[test]
    fn finds_conflicting_framing_in_heads() {
        assert!(conflicting(
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(conflicting(
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"
        ));
        assert!(conflicting(
            "POST / HTTP/1.1\r\ncontent-length: 4\r\ncontent-length: 4\r\n\r\n"
        ));
        assert!(!conflicting(
            "POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nbody"
        ));
        assert!(!conflicting(
            "GET / HTTP/1.1\r\nx-content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
        assert!(!conflicting("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }

    #[test]
    fn leading_empty_lines_do_not_hide_a_head() {
        assert!(conflicting(
            "\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
        assert!(conflicting(
            "\nPOST / HTTP/1.1\ncontent-length: 4\ntransfer-encoding: chunked\n\n"
        ));
    }

    #[test]
    fn pipelined_heads_are_scanned_after_their_bodies() {
        let clean = "GET /a HTTP/1.1\r\nhost: a\r\n\r\n";
        let smuggled =
            "POST /b HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(conflicting(&format!("{clean}{smuggled}")));
        // Behind a body of its own length: the body is skipped, whatever it holds.
        let body = "\r\ncontent-length: 1\r\ntransfer-encoding: x";
        let posted = format!(
            "POST /c HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        assert!(!conflicting(&format!("{posted}{body}{clean}")));
        assert!(conflicting(&format!("{posted}{body}{smuggled}")));
        // Behind a chunked body with an extension and trailers.
        let chunked = "POST /d HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\ntrailer: 1\r\n\r\n";
        assert!(!conflicting(&format!("{chunked}{clean}")));
        assert!(conflicting(&format!("{chunked}{smuggled}")));
        assert!(conflicting(&format!("{clean}{chunked}{clean}{smuggled}")));
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_answer() {
        let streams = [
            ("POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", true),
            ("POST / HTTP/1.1\r\ncontent-length: 4\r\nCONTENT-LENGTH: 4\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nx-note: content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n", false),
            ("GET / HTTP/1.1\r\nx-a-very-long-header-name-indeed: 1\r\ncontent-length: 0\r\n\r\n", false),
            ("GET / HTTP/1.1\nhost: a\ncontent-length: 1\ntransfer-encoding: x\n\n", true),
            ("GET / HTTP/1.1\r\nAccept: content-length: 2\r\nCONTENT-length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", true),
            ("GET / HTTP/1.1\r\na-content-length: 1\r\nx-transfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n", false),
            ("GET / HTTP/1.1\r\n: content-length\r\ntransfer-encoding: chunked\r\n\r\n", false),
            ("POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n", true),
            ("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n", false),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\ncontent-length: 1\ntransfer-encoding: x\n\n", false),
        ];
        for (stream, expected) in streams {
            for cut in 0..=stream.len() {
                let mut framing = Framing::default();
                let (a, b) = stream.as_bytes().split_at(cut);
                let found = framing.scan(a) | framing.scan(b);
                assert_eq!(found, expected, "{stream:?} cut at {cut}");
            }
        }
    }
}
