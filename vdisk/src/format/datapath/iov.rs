//! Sub-ranges of `IoSlice` / `IoSliceMut` lists as plain slice lists (what
//! [`crate::storage::Storage`]'s vectored calls take), on the stack for the usual
//! handful of buffers: the hot path allocates nothing.

use std::io::{IoSlice, IoSliceMut};

/// Pieces kept on the stack; longer lists fall back to a `Vec`.
const INLINE: usize = 8;

/// Total bytes of a list.
pub(super) fn total(bufs: &[IoSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Total bytes of a mutable list.
pub(super) fn total_mut(bufs: &[IoSliceMut<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Index of the buffer holding byte `start` and the offset inside it.
fn locate(lens: impl Iterator<Item = usize>, start: u64) -> (usize, usize) {
    let mut skip = start;
    for (i, l) in lens.enumerate() {
        if skip < l as u64 {
            return (i, skip as usize);
        }
        skip -= l as u64;
    }
    (usize::MAX, 0)
}

/// A slice list being built: on the stack up to [`INLINE`] pieces.
struct Pieces<'a> {
    inline: [&'a [u8]; INLINE],
    spill: Vec<&'a [u8]>,
    n: usize,
}

impl<'a> Pieces<'a> {
    fn push(&mut self, s: &'a [u8]) {
        if self.n < INLINE {
            self.inline[self.n] = s;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push(s);
        }
        self.n += 1;
    }
    fn as_slice(&self) -> &[&'a [u8]] {
        if self.n <= INLINE {
            &self.inline[..self.n]
        } else {
            &self.spill
        }
    }
}

/// Calls `f` with `head`, the pieces of `bufs` covering bytes `[start, start + len)`,
/// then `tail` (empty `head`/`tail` are left out), as one slice list.
pub(super) fn with_pieces<R>(
    bufs: &[IoSlice<'_>],
    start: u64,
    len: u64,
    head: &[u8],
    tail: &[u8],
    f: impl FnOnce(&[&[u8]]) -> R,
) -> R {
    let (first, mut off) = locate(bufs.iter().map(|b| b.len()), start);
    let mut p = Pieces {
        inline: Default::default(),
        spill: Vec::new(),
        n: 0,
    };
    if !head.is_empty() {
        p.push(head);
    }
    let mut left = len as usize;
    for b in bufs.iter().skip(first) {
        if left == 0 {
            break;
        }
        let b: &[u8] = b;
        let take = (b.len() - off).min(left);
        if take > 0 {
            p.push(&b[off..off + take]);
        }
        left -= take;
        off = 0;
    }
    if !tail.is_empty() {
        p.push(tail);
    }
    f(p.as_slice())
}

/// Calls `f` with the pieces of `bufs` covering bytes `[start, start + len)`.
pub(super) fn with_pieces_mut<R>(
    bufs: &mut [IoSliceMut<'_>],
    start: u64,
    len: u64,
    f: impl FnOnce(&mut [&mut [u8]]) -> R,
) -> R {
    let (first, mut off) = locate(bufs.iter().map(|b| b.len()), start);
    let mut inline: [&mut [u8]; INLINE] = Default::default();
    let mut spill: Vec<&mut [u8]> = Vec::new();
    let mut n = 0usize;
    let mut left = len as usize;
    for b in bufs.iter_mut().skip(first) {
        if left == 0 {
            break;
        }
        let b: &mut [u8] = b;
        let take = (b.len() - off).min(left);
        left -= take;
        if take > 0 {
            let piece = &mut b[off..off + take];
            if n < INLINE && spill.is_empty() {
                inline[n] = piece;
            } else {
                if spill.is_empty() {
                    spill.extend(inline.iter_mut().take(n).map(std::mem::take));
                }
                spill.push(piece);
            }
            n += 1;
        }
        off = 0;
    }
    if spill.is_empty() {
        f(&mut inline[..n])
    } else {
        f(&mut spill)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range() {
        let a = [1u8; 3];
        let b = [2u8; 5];
        let c = [3u8; 2];
        let l = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        assert_eq!(total(&l), 10);
        let got = with_pieces(&l, 2, 7, b"h", b"", |p| p.concat());
        assert_eq!(got, [b'h', 1, 2, 2, 2, 2, 2, 3]);
        let got = with_pieces(&l, 8, 2, b"", b"t", |p| p.concat());
        assert_eq!(got, [3, 3, b't']);
        // More pieces than fit inline.
        let many: Vec<[u8; 1]> = (0..20u8).map(|i| [i]).collect();
        let l: Vec<IoSlice> = many.iter().map(|x| IoSlice::new(x)).collect();
        let got = with_pieces(&l, 1, 18, b"", b"", |p| (p.len(), p.concat()));
        assert_eq!(got.0, 18);
        assert_eq!(got.1, (1..19u8).collect::<Vec<_>>());
    }

    #[test]
    fn mutable_pieces() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 4];
        let mut many: Vec<[u8; 1]> = vec![[0]; 12];
        {
            let mut l = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
            assert_eq!(total_mut(&l), 8);
            with_pieces_mut(&mut l, 3, 3, |p| {
                assert_eq!(p.len(), 2);
                for s in p.iter_mut() {
                    s.fill(9);
                }
            });
        }
        assert_eq!(a, [0, 0, 0, 9]);
        assert_eq!(b, [9, 9, 0, 0]);
        let mut l: Vec<IoSliceMut> = many.iter_mut().map(|x| IoSliceMut::new(x)).collect();
        with_pieces_mut(&mut l, 0, 12, |p| {
            assert_eq!(p.len(), 12);
            for s in p.iter_mut() {
                s.fill(1);
            }
        });
        drop(l);
        assert!(many.iter().all(|x| x[0] == 1));
    }
}
