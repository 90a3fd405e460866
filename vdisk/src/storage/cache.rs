//! A bounded in-memory cache of fixed-size blocks of a remote file, least recently
//! used first out, and the read path the remote protocols (HTTP, S3) share on top of
//! it: a miss fetches the run of missing blocks around it in one ranged request (the
//! readahead), large reads bypass the cache. Blocks are shared (`Arc`) so a reader
//! copies out of one after the lock is released.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

/// How a remote file is read through a [`BlockCache`].
#[derive(Clone, Copy, Debug)]
pub struct ReadPolicy {
    /// The file's size: bytes past it read as zero and are never fetched.
    pub size: u64,
    /// Longest run of blocks fetched by one request.
    pub max_fetch: u64,
    /// Reads of at least this many bytes go straight into the caller's buffer.
    pub bypass: u64,
}

/// Blocks of `block` bytes, at most `capacity` of them.
#[derive(Debug)]
pub struct BlockCache {
    block: u64,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    blocks: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    tick: u64,
}

impl BlockCache {
    /// A cache of `capacity` blocks of `block` bytes (`block` > 0).
    pub fn new(block: u64, capacity: usize) -> BlockCache {
        BlockCache {
            block: block.max(1),
            capacity,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block `index`, if cached (and marks it used).
    pub fn get(&self, index: u64) -> Option<Arc<Vec<u8>>> {
        let mut g = self.lock();
        g.tick += 1;
        let t = g.tick;
        let e = g.blocks.get_mut(&index)?;
        e.1 = t;
        Some(Arc::clone(&e.0))
    }

    /// Stores block `index`, evicting the least recently used blocks beyond capacity.
    pub fn put(&self, index: u64, data: Arc<Vec<u8>>) {
        if self.capacity == 0 {
            return;
        }
        let mut g = self.lock();
        g.tick += 1;
        let t = g.tick;
        g.blocks.insert(index, (data, t));
        while g.blocks.len() > self.capacity {
            let Some(old) = g
                .blocks
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            else {
                break;
            };
            g.blocks.remove(&old);
        }
    }

    /// Reads `buf.len()` bytes at `offset` through the cache; `fetch(off, dst)` reads
    /// `dst.len()` bytes at `off` (inside the file) from the server, retrying as its
    /// protocol does.
    pub fn read(
        &self,
        p: &ReadPolicy,
        buf: &mut [u8],
        offset: u64,
        fetch: impl Fn(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let inside = p.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        // Large reads (convert's windows) go straight into the caller's buffer: they are
        // rarely read again, and caching them would only evict the small ones.
        if inside as u64 >= p.bypass {
            return fetch(offset, &mut buf[..inside]);
        }
        let bs = self.block;
        let first = offset / bs;
        let last = (offset + inside as u64 - 1) / bs;
        let blocks = self.blocks(p, first, last, &fetch)?;
        let mut done = 0usize;
        for (k, b) in blocks.iter().enumerate() {
            let bstart = (first + k as u64) * bs;
            let from = (offset + done as u64 - bstart) as usize;
            let n = (b.len() - from.min(b.len())).min(inside - done);
            buf[done..done + n].copy_from_slice(&b[from..from + n]);
            done += n;
        }
        if done != inside {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short read from the server",
            ));
        }
        Ok(())
    }

    /// Blocks `first..=last`, from the cache or fetched (each run of missing blocks
    /// in requests of at most `max_fetch` bytes).
    fn blocks(
        &self,
        p: &ReadPolicy,
        first: u64,
        last: u64,
        fetch: &impl Fn(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<Vec<Arc<Vec<u8>>>> {
        let bs = self.block;
        let per_get = (p.max_fetch / bs).max(1);
        let mut out = Vec::new();
        let mut i = first;
        while i <= last {
            if let Some(b) = self.get(i) {
                out.push(b);
                i += 1;
                continue;
            }
            let mut end = i;
            while end < last && end + 1 - i < per_get && self.get(end + 1).is_none() {
                end += 1;
            }
            let off = i * bs;
            let len = ((end + 1) * bs).min(p.size) - off;
            let mut data = vec![0; len as usize];
            fetch(off, &mut data)?;
            for (k, chunk) in data.chunks(bs as usize).enumerate() {
                let b = Arc::new(chunk.to_vec());
                self.put(i + k as u64, Arc::clone(&b));
                out.push(b);
            }
            i = end + 1;
        }
        Ok(out)
    }

    /// How many blocks are cached.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().blocks.len()
    }

    /// Whether nothing is cached.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let c = BlockCache::new(4, 2);
        c.put(0, Arc::new(vec![0; 4]));
        c.put(1, Arc::new(vec![1; 4]));
        assert!(c.get(0).is_some());
        c.put(2, Arc::new(vec![2; 4]));
        assert_eq!(c.len(), 2);
        assert!(c.get(1).is_none());
        assert_eq!(c.get(0).unwrap()[0], 0);
        assert_eq!(c.get(2).unwrap()[0], 2);
        let none = BlockCache::new(4, 0);
        none.put(0, Arc::new(vec![0; 4]));
        assert!(none.is_empty());
    }

    #[test]
    fn reads_fetch_runs_of_missing_blocks_once() {
        let file: Vec<u8> = (0..100u8).collect();
        let c = BlockCache::new(16, 8);
        let p = ReadPolicy {
            size: 100,
            max_fetch: 32,
            bypass: 64,
        };
        let calls = std::cell::RefCell::new(Vec::new());
        let fetch = |off: u64, dst: &mut [u8]| {
            calls.borrow_mut().push((off, dst.len()));
            dst.copy_from_slice(&file[off as usize..off as usize + dst.len()]);
            Ok(())
        };
        let mut buf = [0u8; 20];
        c.read(&p, &mut buf, 10, fetch).unwrap();
        assert_eq!(&buf[..], &file[10..30]);
        c.read(&p, &mut buf, 12, fetch).unwrap();
        assert_eq!(calls.borrow().as_slice(), &[(0, 32)]);
        let mut tail = [7u8; 20];
        c.read(&p, &mut tail, 90, fetch).unwrap();
        assert_eq!(&tail[..10], &file[90..]);
        assert_eq!(&tail[10..], &[0; 10]);
        let mut big = [0u8; 64];
        c.read(&p, &mut big, 0, fetch).unwrap();
        assert_eq!(calls.borrow().last(), Some(&(0, 64)));
    }
}
