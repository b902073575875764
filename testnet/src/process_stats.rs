//! What this process has used, as Linux reports it under `/proc/self`: CPU time, resident
//! memory and its peak. Every reading is 0 where the file cannot be read (not Linux).

/// CPU time this process has used, in seconds (`/proc/self/stat`, in the kernel's `USER_HZ`
/// ticks of 10 ms).
pub fn cpu_seconds() -> f64 {
    cpu_seconds_at("/proc/self/stat")
}

/// CPU time the process `pid` has used so far, in seconds, as [`cpu_seconds`] reads it.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    cpu_seconds_at(&format!("/proc/{pid}/stat"))
}

fn cpu_seconds_at(stat: &str) -> f64 {
    const TICKS_PER_SECOND: f64 = 100.0;
    std::fs::read_to_string(stat)
        .ok()
        .and_then(|stat| {
            // The fields after the command name, which is in parentheses and may hold spaces.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / TICKS_PER_SECOND)
        })
        .unwrap_or(0.0)
}

/// Resident memory now, in MiB.
pub fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// The most resident memory since the process started or since `reset_peak_rss`, in MiB.
pub fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Starts the peak over from the resident memory now (Linux ≥ 4.0: writing 5 to
/// `/proc/self/clear_refs`). Returns whether the kernel took it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A field of `/proc/self/status` given in kB, in MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
