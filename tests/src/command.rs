//! Running a command-line client (kcat, kpscctl) with input and a deadline.

use std::{
    io::{Read, Write},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Runs `cmd` with `input` on its stdin and its output captured; killed (and an error)
/// if still running after `timeout`.
pub fn run_with_timeout(
    cmd: &mut Command,
    input: &[u8],
    timeout: Duration,
) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    // Threads for every pipe: a client blocked on one full pipe would never exit.
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).map(|_| bytes)
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().context("stdout")?));
    let stderr = read_all(Box::new(child.stderr.take().context("stderr")?));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A client that exits without reading all its input closes the pipe: not our error.
    let _ = writer.join();
    Ok(Output {
        status,
        stdout: stdout.join().expect("stdout reader")?,
        stderr: stderr.join().expect("stderr reader")?,
    })
}
