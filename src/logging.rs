//! Log setup: text or JSON lines on stderr, filtered by `RUST_LOG`
//! (default `info`). Access lines use the target `stackgate::access`.
//!
//! Text lines are written by [`TextFormat`], which prints what
//! tracing-subscriber's default format prints, in its layout:
//!
//! ```text
//! 2026-11-23T08:10:03.719082Z  INFO stackgate::access: forwarded request_id=4a4a… stack=bench token=blt1 route="delivery" status=200 duration_ms=1.853676
//! ```
//!
//! but without its generic machinery (a calendar computation and padded,
//! styled pieces per line): the access log writes a line per request, and the
//! default formatter took about a seventh of the request path's instructions.
//!
//! Access lines are written in batches, as nginx's `access_log ... buffer=64k
//! flush=100ms` writes them ([`Batched`]): a line waits in memory at most
//! [`ACCESS_FLUSH_AFTER`] (written by [`flush_access_lines`], a task of the
//! gateway), or until [`ACCESS_BUFFER`] bytes are waiting, and then goes out
//! with the others in one `write`. Every other line (warnings,
//! errors, registry changes) is written at once, after the access lines
//! before it, so the order on stderr is the order of the events. Lines are
//! whole (none interleaved) and none is dropped: a full buffer is written by
//! the thread that fills it, and [`LogGuard`] writes what waits when the
//! process ends.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The two output formats of `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The target of access lines, the ones written in batches.
pub const ACCESS_TARGET: &str = "stackgate::access";
/// Access lines are written once this many bytes wait.
pub const ACCESS_BUFFER: usize = 64 * 1024;
/// An access line waits at most this long before it is written.
pub const ACCESS_FLUSH_AFTER: Duration = Duration::from_millis(100);

static STDERR: OnceLock<Arc<Batched<io::Stderr>>> = OnceLock::new();

/// Writes stderr's waiting access lines [`ACCESS_FLUSH_AFTER`] after each
/// batch starts, for as long as it runs (the gateway spawns it on its
/// runtime, and it ends with it: [`LogGuard`] writes what waits then). Ends
/// at once without an [`init`].
pub async fn flush_access_lines() {
    if let Some(sink) = STDERR.get() {
        sink.flush_after(ACCESS_FLUSH_AFTER, CancellationToken::new())
            .await;
    }
}

/// Installs the global subscriber, writing to stderr. Safe to call once per
/// process; keep the guard until the process ends (it writes the access
/// lines still waiting).
pub fn init(format: LogFormat) -> LogGuard {
    let sink = STDERR.get_or_init(|| Arc::new(Batched::new(io::stderr(), ACCESS_BUFFER)));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(MakeLines(Arc::clone(sink)));
    let _ = match format {
        LogFormat::Text => builder.event_format(TextFormat).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogGuard(())
}

/// Writes the access lines that wait, now (before writing to stderr
/// directly, so that what was logged comes first).
pub fn flush() {
    if let Some(sink) = STDERR.get() {
        sink.flush();
    }
}

/// Writes the access lines still waiting when it is dropped.
#[must_use = "dropping the guard is when the last access lines are written"]
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush();
    }
}

/// Log lines on their way to `out`: access lines ([`ACCESS_TARGET`]) wait,
/// up to `limit` bytes, to be written together; any other line is written
/// at once, behind them. The writer that fills the buffer writes it; a task
/// of the gateway's runtime ([`flush_access_lines`]) writes a batch that has
/// waited [`ACCESS_FLUSH_AFTER`]. No thread of its own: on a gateway pinned
/// to one CPU, a writer thread woken per batch competed with the runtime.
pub struct Batched<W> {
    state: Mutex<Pending<W>>,
    /// Tells the flushing task that a batch started.
    started: tokio::sync::Notify,
    limit: usize,
}

struct Pending<W> {
    out: W,
    lines: Vec<u8>,
    /// Whether lines wait.
    waiting: bool,
}

impl<W: io::Write> Batched<W> {
    /// A sink writing to `out`.
    pub fn new(out: W, limit: usize) -> Self {
        Batched {
            state: Mutex::new(Pending {
                out,
                lines: Vec::with_capacity(limit),
                waiting: false,
            }),
            started: tokio::sync::Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending<W>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a whole line; `wait`: it may wait for the batch.
    pub fn write_line(&self, line: &[u8], wait: bool) {
        let mut state = self.lock();
        state.lines.extend_from_slice(line);
        // A line that does not wait goes out with those waiting before it,
        // in one write.
        if !wait || state.lines.len() >= self.limit {
            state.write_out();
        } else if !state.waiting {
            state.waiting = true;
            self.started.notify_one();
        }
    }

    /// Writes what waits.
    pub fn flush(&self) {
        self.lock().write_out();
    }

    /// Writes each batch `after` it started, until `stop`; then writes what
    /// waits and returns.
    pub async fn flush_after(&self, after: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.started.notified() => {}
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(after) => self.flush(),
            }
        }
        self.flush();
    }
}

impl<W: io::Write> Pending<W> {
    fn write_out(&mut self) {
        if !self.lines.is_empty() {
            // As with unbatched lines, a failing stderr loses the lines: there
            // is nowhere else to say so.
            let _ = self.out.write_all(&self.lines);
            let _ = self.out.flush();
            self.lines.clear();
        }
        self.waiting = false;
    }
}

/// One event's line, handed to its [`Batched`] in one piece.
pub struct LineWriter<'a, W> {
    sink: &'a Batched<W>,
    wait: bool,
}

impl<W: io::Write> io::Write for LineWriter<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.sink.write_line(bytes, self.wait);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a subscriber writes its lines with: access lines wait for their
/// batch, others go at once.
pub struct MakeLines<W>(pub Arc<Batched<W>>);

impl<'a, W: io::Write + 'a> MakeWriter<'a> for MakeLines<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            sink: &self.0,
            wait: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LineWriter {
            sink: &self.0,
            wait: meta.target() == ACCESS_TARGET,
        }
    }
}

/// The text line format (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFormat;

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write_timestamp(&mut writer)?;
        writer.write_str(level_column(meta.level()))?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                writer.write_str(span.name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(writer, "{{{fields}}}")?;
                    }
                }
                writer.write_char(':')?;
            }
            writer.write_char(' ')?;
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = TextFields {
            writer: &mut writer,
            result: Ok(()),
            first: true,
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// ` LEVEL ` padded to five characters, between the time and the target.
fn level_column(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => " ERROR ",
        Level::WARN => "  WARN ",
        Level::INFO => "  INFO ",
        Level::DEBUG => " DEBUG ",
        Level::TRACE => " TRACE ",
    }
}

thread_local! {
    /// The last whole second formatted on this thread, and its text up to
    /// and including the `.` before the microseconds.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// `2026-11-23T08:10:03.719082Z` (UTC, microseconds).
fn write_timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        prefix = second_prefix(secs);
        SECOND.set((secs, prefix));
    }
    // The prefix is ASCII digits and punctuation.
    writer.write_str(std::str::from_utf8(&prefix).map_err(|_| fmt::Error)?)?;
    let mut micros = [b'0'; 7];
    let mut value = now.subsec_micros();
    for digit in micros[..6].iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
    micros[6] = b'Z';
    writer.write_str(std::str::from_utf8(&micros).map_err(|_| fmt::Error)?)
}

/// `YYYY-MM-DDThh:mm:ss.` for a Unix time in seconds.
fn second_prefix(secs: u64) -> [u8; 20] {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let mut out = [0u8; 20];
    let mut put = |at: usize, value: u64, width: usize| {
        let mut value = value;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year, 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, of_day / 3600, 2);
    put(14, of_day / 60 % 60, 2);
    put(17, of_day % 60, 2);
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ] {
        out[at] = sep;
    }
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Writes an event's fields as the default format does: the message first
/// as it is, then ` name=value` with strings quoted and escaped (`Debug`),
/// `%` values as their `Display` and `?` values as their `Debug`.
struct TextFields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl TextFields<'_, '_> {
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        if !self.first {
            self.result = self.writer.write_char(' ');
        }
        self.first = false;
        if field.name() != "message" {
            let name = field.name();
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }
}

impl Visit for TextFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            self.writer.write_str(value)
        } else if value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            self.writer.write_char('"').and_then(|()| {
                self.writer.write_str(value)?;
                self.writer.write_char('"')
            })
        } else {
            write!(self.writer, "{value:?}")
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            let mut counted = Counted {
                inner: &mut *self.writer,
                written: 0,
            };
            self.result = fmt::Write::write_fmt(&mut counted, format_args!("{value:?}"));
            // An empty value reads as `""`, so that `token= route=x` cannot
            // be misread as a token named `route=x`.
            if counted.written == 0 && field.name() != "message" {
                self.result = self.result.and_then(|()| self.writer.write_str("\"\""));
            }
        }
    }
}

/// A writer that counts what passes through it.
struct Counted<'a, W: fmt::Write> {
    inner: &'a mut W,
    written: usize,
}

impl<W: fmt::Write> fmt::Write for Counted<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.written += s.len();
        self.inner.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn dates_match_the_calendar() {
        assert_eq!(&second_prefix(0), b"1970-01-01T00:00:00.");
        // 2000-02-29 (a leap day in a century year) 12:34:56.
        assert_eq!(&second_prefix(951_827_696), b"2000-02-29T12:34:56.");
        assert_eq!(&second_prefix(1_795_392_000), b"2026-11-23T00:00:00.");
        assert_eq!(&second_prefix(4_102_444_799), b"2099-12-31T23:59:59.");
    }

    #[derive(Clone)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What one event prints with `format`.
    fn line<F>(format: F, emit: impl FnOnce()) -> String
    where
        F: FormatEvent<
                tracing_subscriber::Registry,
                tracing_subscriber::fmt::format::DefaultFields,
            > + Send
            + Sync
            + 'static,
    {
        use tracing_subscriber::layer::SubscriberExt;
        let buffer = Buffer(Arc::new(Mutex::new(Vec::new())));
        let writer = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .event_format(format)
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn text_lines_read_like_the_default_format() {
        let emit = || {
            let id = "4a4ab98e";
            tracing::info!(
                target: "stackgate::access",
                request_id = %id,
                stack = "bench",
                token = %"blt1",
                route = "delivery",
                quoted = "say \"hi\"\n",
                status = 200u16,
                delta = -3i64,
                duration_ms = 1.5f64,
                "forwarded"
            );
        };
        let ours = line(TextFormat, emit);
        let theirs = line(tracing_subscriber::fmt::format().with_ansi(false), emit);
        // The same after the timestamp, which differs by the time it took.
        let after_time = |l: &str| l.split_once("Z ").map(|(_, rest)| rest.to_owned());
        assert_eq!(after_time(&ours), after_time(&theirs), "{ours}\n{theirs}");
        assert_eq!(
            after_time(&ours).unwrap(),
            " INFO stackgate::access: forwarded request_id=4a4ab98e stack=\"bench\" token=blt1 \
             route=\"delivery\" quoted=\"say \\\"hi\\\"\\n\" status=200 delta=-3 duration_ms=1.5\n"
        );
        // `2026-11-23T08:10:03.719082Z`: a date, a time and six digits.
        let stamp = ours.split(' ').next().unwrap();
        assert_eq!(stamp.len(), 27, "{stamp}");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
            "{stamp}"
        );
        let theirs_stamp = theirs.split(' ').next().unwrap();
        assert_eq!(stamp[..16], theirs_stamp[..16], "the same minute");
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn batched(limit: usize) -> (Arc<Batched<Buffer>>, Buffer) {
        let out = Buffer(Arc::new(Mutex::new(Vec::new())));
        (Arc::new(Batched::new(out.clone(), limit)), out)
    }

    #[test]
    fn access_lines_wait_and_other_lines_write_them_first() {
        let (sink, out) = batched(1024);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(TextFormat)
            .with_writer(MakeLines(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: ACCESS_TARGET, n = 1, "forwarded");
            tracing::info!(target: ACCESS_TARGET, n = 2, "forwarded");
            assert_eq!(out.text(), "", "access lines wait for their batch");
            tracing::warn!(target: "stackgate::registry", "sync failed");
        });
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with("forwarded n=1"), "{text}");
        assert!(lines[1].ends_with("forwarded n=2"), "{text}");
        assert!(lines[2].ends_with("sync failed"), "{text}");
    }

    #[test]
    fn a_full_batch_is_written_by_the_line_that_fills_it() {
        let (sink, out) = batched(100);
        let line = [b'x'; 39];
        let line = [&line[..], b"\n"].concat();
        sink.write_line(&line, true);
        sink.write_line(&line, true);
        assert_eq!(out.text(), "");
        sink.write_line(&line, true);
        assert_eq!(out.text().len(), 120, "three lines of 40 bytes");
        sink.write_line(&line, true);
        assert_eq!(out.text().len(), 120);
        sink.flush();
        assert_eq!(out.text().len(), 160, "flushing writes what waits");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_written_flush_after_it_started() {
        let (sink, out) = batched(1 << 20);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (sink, stop) = (Arc::clone(&sink), stop.clone());
            async move { sink.flush_after(Duration::from_millis(100), stop).await }
        });
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        sink.write_line(b"one\n", true);
        tokio::time::sleep(Duration::from_millis(60)).await;
        sink.write_line(b"two\n", true);
        tokio::time::sleep(Duration::from_millis(39)).await;
        assert_eq!(out.text(), "", "not yet: the batch started 99 ms ago");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(out.text(), "one\ntwo\n");
        assert!(started.elapsed() <= Duration::from_millis(101));
        // The next batch starts its own 100 ms.
        sink.write_line(b"three\n", true);
        tokio::time::sleep(Duration::from_millis(99)).await;
        assert_eq!(out.text(), "one\ntwo\n");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(out.text(), "one\ntwo\nthree\n");
        // Stopping writes what waits.
        sink.write_line(b"four\n", true);
        stop.cancel();
        task.await.unwrap();
        assert_eq!(out.text(), "one\ntwo\nthree\nfour\n");
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_all() {
        let (sink, out) = batched(4096);
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let line = format!("thread={t} line={i} {}\n", "y".repeat(i % 97));
                        sink.write_line(line.as_bytes(), i % 500 != 0);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        sink.flush();
        let text = out.text();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let (head, pad) = line.rsplit_once(' ').unwrap();
            let (t, i) = head.split_once(' ').unwrap();
            let t: usize = t.strip_prefix("thread=").unwrap().parse().unwrap();
            let i: usize = i.strip_prefix("line=").unwrap().parse().unwrap();
            assert_eq!(i, next[t], "thread {t}'s lines in order, none lost");
            assert_eq!(pad, "y".repeat(i % 97), "{line}");
            next[t] += 1;
        }
        assert_eq!(next, [2000; 4]);
    }
}
