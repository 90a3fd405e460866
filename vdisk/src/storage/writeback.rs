//! Early writeback of sequential write streams into a buffered file.
//!
//! A bulk write followed by a flush (an allocating `bench -w`, a guest writing a large
//! file and then `fsync`, `commit`) leaves the whole stream dirty in the page cache, so
//! the flush at the end waits for all of it to reach the device while nothing else
//! runs. Starting writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`) of the part of
//! the stream already behind the writers lets the device work while the stream goes
//! on; the flush then has only the tail left. This is what PostgreSQL's
//! `backend_flush_after` and RocksDB's `bytes_per_sync` do. Durability is unchanged:
//! writeback started early is only what the kernel would do later anyway, and
//! acknowledged data still becomes durable by the flush.
//!
//! Only streams are pushed. Random rewrites of a file (a VM's working set) are left
//! to the page cache, where a block rewritten soon costs one device write, not two:
//! a range is pushed only when most bytes written since the last push landed near the
//! end of the stream and they fill at least a quarter of the range.

use std::sync::Mutex;

/// Writes this far behind the stream's front may still be in flight from other
/// workers (parallel writers finish out of order): their range is not pushed yet.
pub const WINDOW: u64 = 4 << 20;
/// Push once the settled part of the stream has grown by this much.
pub const KICK: u64 = 8 << 20;

/// Tracks one file's write stream; see the module documentation.
#[derive(Debug, Default)]
pub struct WritebackAhead {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The highest end of any write so far.
    front: u64,
    /// Where the next push starts: everything before it was decided on.
    decided: u64,
    /// Bytes written within [`WINDOW`] of the front since the last decision.
    near: u64,
    /// All bytes written since the last decision.
    total: u64,
}

impl WritebackAhead {
    /// Records a write of `len` bytes at `offset`; returns the range `(offset, len)`
    /// whose writeback should start now, if any.
    pub fn wrote(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.front = s.front.max(end);
        s.total = s.total.saturating_add(len);
        if end.saturating_add(WINDOW) >= s.front {
            s.near = s.near.saturating_add(len);
        }
        let settled = s.front.saturating_sub(WINDOW) & !4095;
        if settled < s.decided.saturating_add(KICK) {
            return None;
        }
        let start = s.decided;
        let span = settled - start;
        let stream = s.near >= span / 4 && s.near >= s.total / 2;
        s.decided = settled;
        s.near = 0;
        s.total = 0;
        stream.then_some((start, span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_sequential_stream_is_pushed_behind_its_front() {
        let w = WritebackAhead::default();
        let mut pushed = Vec::new();
        for i in 0..(64 * 16) {
            if let Some(r) = w.wrote(i * 64 * 1024, 64 * 1024) {
                pushed.push(r);
            }
        }
        // 64 MiB written: pushes of KICK each, contiguous, ending WINDOW behind.
        assert!(!pushed.is_empty());
        assert_eq!(pushed[0].0, 0);
        for p in pushed.windows(2) {
            assert_eq!(p[0].0 + p[0].1, p[1].0, "{pushed:?}");
        }
        let last = pushed.last().unwrap();
        assert!(last.0 + last.1 <= 64 * MIB - WINDOW);
        assert!(last.0 + last.1 >= 64 * MIB - WINDOW - KICK);
    }

    #[test]
    fn out_of_order_parallel_writers_still_count_as_a_stream() {
        let w = WritebackAhead::default();
        let mut pushed = 0;
        // Two workers a few MiB apart, interleaved.
        for i in 0..512u64 {
            let a = i * 128 * 1024;
            for off in [a + 2 * MIB, a] {
                pushed += w.wrote(off, 64 * 1024).map_or(0, |r| r.1);
            }
        }
        assert!(pushed >= 32 * MIB, "{pushed}");
    }

    #[test]
    fn random_rewrites_of_a_file_are_never_pushed() {
        let w = WritebackAhead::default();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (1 << 30)) & !4095;
            assert_eq!(w.wrote(off, 4096), None, "at {off}");
        }
    }

    #[test]
    fn a_sparse_stream_with_little_data_is_not_pushed() {
        let w = WritebackAhead::default();
        // 64 KiB written every 4 MiB: under a quarter of the range.
        for i in 0..64u64 {
            assert_eq!(w.wrote(i * 4 * MIB, 64 * 1024), None);
        }
    }

    #[test]
    fn a_stream_with_metadata_writes_behind_it_is_still_pushed() {
        let w = WritebackAhead::default();
        let mut pushed = 0;
        // A qcow2 allocating stream: a 64 KiB cluster at the end, and every 16th
        // write a 64 KiB table update near the start of the file.
        for i in 0..1024u64 {
            pushed += w.wrote(MIB + i * 64 * 1024, 64 * 1024).map_or(0, |r| r.1);
            if i % 16 == 0 {
                assert_eq!(w.wrote(256 * 1024, 64 * 1024), None);
            }
        }
        assert!(pushed >= 48 * MIB, "{pushed}");
    }

    #[test]
    fn offsets_near_the_top_do_not_overflow() {
        let w = WritebackAhead::default();
        let _ = w.wrote(u64::MAX - 10, 100);
        let _ = w.wrote(u64::MAX, u64::MAX);
        let _ = w.wrote(0, 1);
    }
}
