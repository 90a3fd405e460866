//! Number and time formatting the way qemu-io prints its reports, so scripts and
//! filters written for qemu-io output work unchanged on ours.

use std::io::Write;
use std::time::Duration;

/// Formats a byte count like qemu's `cvtstr`: binary units with three decimals, and a
/// trailing `.000` dropped (`4 KiB`, `1.500 MiB`, `300 bytes`).
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(&str, u32); 6] = [
        (" EiB", 60),
        (" PiB", 50),
        (" TiB", 40),
        (" GiB", 30),
        (" MiB", 20),
        (" KiB", 10),
    ];
    let (mut s, suffix) = UNITS
        .iter()
        .find(|(_, shift)| value >= (1u64 << shift) as f64)
        .map(|(suffix, shift)| (format!("{:.3}", value / (1u64 << shift) as f64), *suffix))
        .unwrap_or_else(|| (format!("{value:.6}"), " bytes"));
    // qemu cuts the string at the first ".000", wherever it is.
    if let Some(i) = s.find(".000") {
        s.truncate(i);
    }
    s.push_str(suffix);
    s
}

/// Formats an elapsed time like qemu-io's `timestr`: `SS.CC sec` under a second's
/// worth of whole seconds, `H:MM:SS.CC` otherwise or when `verbose` (the `-C` form).
pub fn timestr(t: Duration, verbose: bool) -> String {
    let secs = t.as_secs();
    let centi = t.subsec_nanos() / 10_000_000;
    if verbose || secs > 0 {
        format!(
            "{}:{:02}:{:02}.{:02}",
            secs / 3600,
            (secs % 3600) / 60,
            secs % 60,
            centi
        )
    } else {
        format!("{:02}.{:02} sec", secs % 60, centi)
    }
}

/// Prints the two report lines after an I/O command (or the one `-C` line).
pub fn print_report(op: &str, t: Duration, offset: u64, count: u64, total: u64, machine: bool) {
    // A zero duration would print "inf"; qemu's clock never reads exactly zero either.
    let secs = t.as_secs_f64().max(1e-9);
    let ops = 1.0 / secs;
    if machine {
        out!(
            "{},{},{},{:.3},{:.3}",
            total,
            1,
            timestr(t, true),
            total as f64 / secs,
            ops
        );
    } else {
        out!("{op} {total}/{count} bytes at offset {offset}");
        out!(
            "{}, 1 ops; {} ({}/sec and {:.4} ops/sec)",
            cvtstr(total as f64),
            timestr(t, false),
            cvtstr(total as f64 / secs),
            ops
        );
    }
}

/// Writes a hex dump like qemu-io's `read -v`: 16 bytes a line, offset in 8 hex digits,
/// alphanumerics shown as themselves and everything else as `.`.
pub fn dump_buffer(out: &mut impl Write, buf: &[u8], offset: u64) -> std::io::Result<()> {
    let mut line = String::with_capacity(80);
    for (i, chunk) in buf.chunks(16).enumerate() {
        line.clear();
        line.push_str(&format!("{:08x}:  ", offset + 16 * i as u64));
        for b in chunk {
            line.push_str(&format!("{b:02x} "));
        }
        line.push(' ');
        line.extend(chunk.iter().map(|&b| {
            if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            }
        }));
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_matches_qemu() {
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(300.0), "300 bytes");
        assert_eq!(cvtstr(500.5), "500.500000 bytes");
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr((1u64 << 29) as f64), "512 MiB");
        assert_eq!(cvtstr(10.0 * (1u64 << 30) as f64), "10 GiB");
    }

    #[test]
    fn timestr_matches_qemu() {
        assert_eq!(timestr(Duration::from_millis(5), false), "00.00 sec");
        assert_eq!(timestr(Duration::from_millis(250), false), "00.25 sec");
        assert_eq!(timestr(Duration::from_millis(61_500), false), "0:01:01.50");
        assert_eq!(timestr(Duration::from_millis(5), true), "0:00:00.00");
    }

    #[test]
    fn dump_matches_qemu() {
        let mut v = Vec::new();
        let mut buf = vec![0u8; 10];
        buf.extend_from_slice(&[0x12; 6]);
        buf.extend_from_slice(b"Az9!");
        dump_buffer(&mut v, &buf, 0x5a).unwrap();
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "0000005a:  00 00 00 00 00 00 00 00 00 00 12 12 12 12 12 12  ................\n\
             0000006a:  41 7a 39 21  Az9.\n"
        );
    }
}
