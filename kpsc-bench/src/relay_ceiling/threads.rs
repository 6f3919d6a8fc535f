//! CPU time of this process and of its io_uring kernel threads, from /proc.

pub struct Sample {
    /// The whole process, exited threads included (what kpsc-bench charges the target).
    pub process_seconds: f64,
    /// io-wq workers alive now (`iou-wrk-*`) and their CPU time.
    pub io_wq_threads: usize,
    pub io_wq_seconds: f64,
    /// The SQ polling thread (`iou-sqp-*`).
    pub sq_seconds: f64,
}

/// (command name, user + system seconds) from a /proc stat line.
fn parse(stat: &str) -> Option<(String, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64;
    let t = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((name, t / ticks))
}

pub fn sample() -> Sample {
    let process_seconds = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse(&s))
        .map_or(0.0, |(_, t)| t);
    let mut sample = Sample {
        process_seconds,
        io_wq_threads: 0,
        io_wq_seconds: 0.0,
        sq_seconds: 0.0,
    };
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return sample;
    };
    for task in tasks.flatten() {
        let Some((name, t)) = std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|s| parse(&s))
        else {
            continue;
        };
        if name.starts_with("iou-wrk") {
            sample.io_wq_threads += 1;
            sample.io_wq_seconds += t;
        } else if name.starts_with("iou-sqp") {
            sample.sq_seconds += t;
        }
    }
    sample
}
