#![no_main]
//! `kpsc::kafka::frame`: a byte stream is read through `FrameReader` the way each caller
//! reads it (the discovery client, the request path, the response path), from a source that
//! returns reads of fuzzed sizes, and compared with a plain split of the same stream into
//! frames. Checked: every frame comes out whole and in order and never a byte more than was
//! framed; each error is the one the stream calls for; what stays buffered is always the
//! next bytes of the stream; `write_frame` puts back exactly the frame that was read.

use std::{
    io,
    pin::{Pin, pin},
    task::{Context, Poll, Waker},
};

use kpsc::kafka::{
    frame::{FrameError, FrameReader, MoveError, SIZE_LEN, frame_size, write_frame},
    request::REQUEST_HEADER_FIXED_LEN,
};
use kpsc_fuzz::{FrameInput, FrameMode};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

fuzz_target!(|data: &[u8]| {
    if let Some(input) = FrameInput::parse(data) {
        check(&input);
    }
});

#[derive(Debug, PartialEq)]
enum Step {
    /// A whole frame, size prefix included.
    Frame(Vec<u8>),
    /// Clean end of the stream between frames.
    End,
    Error(Kind),
}

#[derive(Debug, PartialEq)]
enum Kind {
    NegativeSize,
    TooLarge,
    TooSmall,
    Truncated,
}

impl From<FrameError> for Step {
    fn from(e: FrameError) -> Self {
        Step::Error(match e {
            FrameError::NegativeSize(_) => Kind::NegativeSize,
            FrameError::TooLarge { .. } => Kind::TooLarge,
            FrameError::TooSmall { .. } => Kind::TooSmall,
            FrameError::Truncated => Kind::Truncated,
            FrameError::BadHeader(_) | FrameError::Io(_) => panic!("unexpected error: {e}"),
        })
    }
}

fn check(input: &FrameInput) {
    let stream = input.stream;
    let source = Chunked::new(stream, input.chunking);
    let mut reader = FrameReader::new(source, input.capacity);
    assert_eq!(reader.capacity(), input.capacity);
    // Bytes the caller looks at before it validates the size, and the smallest frame body.
    let (peek, min) = match input.mode {
        FrameMode::ReadFrame => (SIZE_LEN, 4),
        FrameMode::Requests => (SIZE_LEN, REQUEST_HEADER_FIXED_LEN as u32),
        FrameMode::Responses => (SIZE_LEN + 4, 4),
    };
    let expected = reference(stream, input.max, min, peek);
    let mut consumed = 0;
    for (index, want) in expected.iter().enumerate() {
        let got = match input.mode {
            FrameMode::ReadFrame => read_frame(&mut reader, input.max),
            FrameMode::Requests => request(&mut reader, input.max, index),
            FrameMode::Responses => response(&mut reader, input.max, index),
        };
        assert_eq!(&got, want, "frame {index} ({:?})", input.mode);
        let Step::Frame(frame) = got else { break };
        consumed += frame.len();
        // Whatever is still buffered is the stream's next bytes.
        let buffered = reader.buffered();
        assert!(consumed + buffered.len() <= stream.len());
        assert_eq!(buffered, &stream[consumed..consumed + buffered.len()]);
    }
}

/// The stream split into frames, up to and including the first end or error. A caller
/// that needs `peek` bytes before it reads the size reports a shorter rest as truncated.
fn reference(stream: &[u8], max: u32, min: u32, peek: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rest = stream;
    loop {
        if rest.is_empty() {
            steps.push(Step::End);
            return steps;
        }
        if rest.len() < peek {
            steps.push(Step::Error(Kind::Truncated));
            return steps;
        }
        let size = i32::from_be_bytes(rest[..4].try_into().unwrap());
        let error = if size < 0 {
            Some(Kind::NegativeSize)
        } else if size as u32 > max {
            Some(Kind::TooLarge)
        } else if (size as u32) < min {
            Some(Kind::TooSmall)
        } else if rest.len() < SIZE_LEN + size as usize {
            Some(Kind::Truncated)
        } else {
            None
        };
        if let Some(kind) = error {
            steps.push(Step::Error(kind));
            return steps;
        }
        let (frame, tail) = rest.split_at(SIZE_LEN + size as usize);
        steps.push(Step::Frame(frame.to_vec()));
        rest = tail;
    }
}

/// The discovery client: `read_frame` in a loop; the body re-framed by `write_frame`.
fn read_frame(reader: &mut FrameReader<Chunked>, max: u32) -> Step {
    let mut body = vec![0xee; 3]; // read_frame clears what was there
    match now(reader.read_frame(max, &mut body)) {
        Ok(true) => {
            let mut framed = Vec::new();
            now(write_frame(&mut framed, &body)).unwrap();
            assert_eq!(&framed[SIZE_LEN..], &body[..]);
            Step::Frame(framed)
        }
        Ok(false) => Step::End,
        Err(e) => e.into(),
    }
}

/// The request path (`proxy/connection/requests.rs`): size, header peek, Produce peek, then
/// the bulk mover's `take_buffered` + copy of the rest.
fn request(reader: &mut FrameReader<Chunked>, max: u32, index: usize) -> Step {
    request_step(reader, max, index).unwrap_or_else(Step::from)
}

fn request_step(
    reader: &mut FrameReader<Chunked>,
    max: u32,
    index: usize,
) -> Result<Step, FrameError> {
    let Some(size) = next_size(reader, SIZE_LEN, max, REQUEST_HEADER_FIXED_LEN as u32)? else {
        return Ok(Step::End);
    };
    let frame_len = SIZE_LEN + size as usize;
    now(reader.fill_to(SIZE_LEN + REQUEST_HEADER_FIXED_LEN))?;
    let peek = frame_len.min(reader.capacity());
    now(reader.fill_to(peek))?;
    assert!(reader.buffered().len() >= peek);
    let head = reader.buffered()[..peek].to_vec();
    let mut frame = reader.take_buffered(index % (peek + 1)).to_vec();
    assert_eq!(frame, head[..frame.len()]);
    let rest = frame_len - frame.len();
    now(reader.copy_to(rest, &mut frame)).map_err(source)?;
    assert_eq!(frame[..peek], head);
    Ok(Step::Frame(frame))
}

/// The response path (`proxy/connection/responses.rs`): size + correlation id peek, then
/// the frame copied through or its body read for rewriting.
fn response(reader: &mut FrameReader<Chunked>, max: u32, index: usize) -> Step {
    response_step(reader, max, index).unwrap_or_else(Step::from)
}

fn response_step(
    reader: &mut FrameReader<Chunked>,
    max: u32,
    index: usize,
) -> Result<Step, FrameError> {
    let Some(size) = next_size(reader, SIZE_LEN + 4, max, 4)? else {
        return Ok(Step::End);
    };
    let prefix: [u8; 4] = reader.buffered()[..SIZE_LEN].try_into().unwrap();
    let mut frame = Vec::new();
    if index.is_multiple_of(2) {
        now(reader.copy_to(SIZE_LEN + size as usize, &mut frame)).map_err(source)?;
    } else {
        reader.consume(SIZE_LEN);
        frame.extend_from_slice(&prefix);
        now(reader.read_into(size as usize, &mut frame))?;
    }
    Ok(Step::Frame(frame))
}

/// With `peek` bytes buffered, the next frame's validated size; None at a clean end.
fn next_size(
    reader: &mut FrameReader<Chunked>,
    peek: usize,
    max: u32,
    min: u32,
) -> Result<Option<u32>, FrameError> {
    if !now(reader.fill_to(peek))? {
        return Ok(None);
    }
    let prefix = reader.buffered()[..SIZE_LEN].try_into().unwrap();
    frame_size(prefix, max, min, "frame").map(Some)
}

/// The source's side of a move: writing into a `Vec` cannot fail, and the copy path has no
/// io_uring to fail.
fn source(e: MoveError) -> FrameError {
    match e {
        MoveError::Source(e) => e,
        MoveError::Sink(e) => panic!("writing into a Vec failed: {e}"),
        MoveError::Mover(e) => panic!("the copy path reported a mover failure: {e}"),
    }
}

/// A source that hands out the stream in reads of pseudo-random sizes (1..=16 bytes when
/// `chunking` is odd, 1..=1024 when even, whatever is asked when 0) and is never pending.
struct Chunked<'a> {
    data: &'a [u8],
    state: u32,
    /// Reads of at most 16 bytes (else at most 1024).
    odd: bool,
}

impl<'a> Chunked<'a> {
    fn new(data: &'a [u8], chunking: u8) -> Self {
        Self {
            data,
            state: u32::from(chunking),
            odd: !chunking.is_multiple_of(2),
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let limit = if self.state == 0 {
            usize::MAX
        } else {
            self.state = self.state.wrapping_mul(1_103_515_245).wrapping_add(12_345) | 1;
            let largest = if self.odd { 16 } else { 1024 };
            1 + (self.state >> 16) as usize % largest
        };
        let n = limit.min(buf.remaining()).min(self.data.len());
        let (chunk, rest) = self.data.split_at(n);
        buf.put_slice(chunk);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future that cannot be pending (the source never is) to completion.
fn now<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("the source is never pending"),
    }
}
