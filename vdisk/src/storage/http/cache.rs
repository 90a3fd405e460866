//! A bounded in-memory cache of fixed-size blocks of a remote file, least recently
//! used first out. Blocks are shared (`Arc`) so a reader copies out of one after the
//! lock is released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

    /// The block size.
    pub fn block(&self) -> u64 {
        self.block
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
}
