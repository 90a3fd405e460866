//! Zero detection (`--detect-zeroes`, QEMU's `detect-zeroes` block option): a data
//! write whose buffer is all zeroes becomes a zero write, so the format can record a
//! zero cluster (or, with `unmap`, deallocate) instead of storing zero bytes.
//!
//! As in QEMU, the whole request is tested, not its clusters one by one, and compressed
//! writes are tested too (QEMU's block layer turns an all-zero compressed write into a
//! zero write before the format sees it); zero writes and discards pass unchanged.

use super::{Request, WriteHook};
use crate::error::{Invalid, Result};
use crate::format::ZeroFlags;
use std::sync::Arc;

/// The `detect-zeroes` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroesMode {
    /// Write the bytes as given.
    #[default]
    Off,
    /// All-zero writes become zero writes that keep the range allocated.
    On,
    /// All-zero writes become zero writes that may deallocate.
    Unmap,
}

impl DetectZeroesMode {
    /// Parses QEMU's value (`off`, `on`, `unmap`).
    pub fn parse(s: &str) -> Result<DetectZeroesMode> {
        match s {
            "off" => Ok(DetectZeroesMode::Off),
            "on" => Ok(DetectZeroesMode::On),
            "unmap" => Ok(DetectZeroesMode::Unmap),
            other => Err(Invalid::BadEnumValue(other.to_string()).into()),
        }
    }
}

/// The zero-detection hook.
#[derive(Debug)]
pub struct DetectZeroes {
    unmap: bool,
}

impl DetectZeroes {
    /// The hook for `mode`, or `None` for [`DetectZeroesMode::Off`] (register nothing,
    /// so writes keep the hook-free path). `Unmap` deallocates only when the image's
    /// discard policy allows it (`discard_unmap`), as QEMU does.
    pub fn for_mode(mode: DetectZeroesMode, discard_unmap: bool) -> Option<Arc<dyn WriteHook>> {
        match mode {
            DetectZeroesMode::Off => None,
            DetectZeroesMode::On => Some(Arc::new(DetectZeroes { unmap: false })),
            DetectZeroesMode::Unmap => Some(Arc::new(DetectZeroes {
                unmap: discard_unmap,
            })),
        }
    }
}

impl WriteHook for DetectZeroes {
    fn before(&self, req: &mut Request<'_>) -> Result<()> {
        if let Request::Write { offset, data } | Request::Compressed { offset, data } = req {
            if !data.is_empty() && data.is_zero() {
                *req = Request::Zeroes {
                    offset: *offset,
                    len: data.len() as u64,
                    flags: ZeroFlags {
                        may_unmap: self.unmap,
                        fast: false,
                    },
                };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::Payload;

    fn run(hook: &Arc<dyn WriteHook>, buf: &[u8]) -> String {
        let mut r = Request::Write {
            offset: 4096,
            data: Payload::borrowed(buf),
        };
        hook.before(&mut r).unwrap();
        format!("{:?}", r.change())
    }

    #[test]
    fn zero_buffers_become_zero_writes() {
        let on = DetectZeroes::for_mode(DetectZeroesMode::On, true).unwrap();
        assert_eq!(
            run(&on, &[0; 512]),
            "Zeroes { offset: 4096, len: 512, may_unmap: false }"
        );
        assert_eq!(run(&on, &[0, 1]), "Write { offset: 4096, len: 2 }");
        let mut c = Request::Compressed {
            offset: 0,
            data: Payload::borrowed(&[0; 64]),
        };
        on.before(&mut c).unwrap();
        assert!(matches!(c, Request::Zeroes { len: 64, .. }), "{c:?}");
        let unmap = DetectZeroes::for_mode(DetectZeroesMode::Unmap, true).unwrap();
        assert_eq!(
            run(&unmap, &[0; 512]),
            "Zeroes { offset: 4096, len: 512, may_unmap: true }"
        );
        // Without discard=unmap, unmap behaves as on.
        let kept = DetectZeroes::for_mode(DetectZeroesMode::Unmap, false).unwrap();
        assert_eq!(
            run(&kept, &[0; 512]),
            "Zeroes { offset: 4096, len: 512, may_unmap: false }"
        );
        assert!(DetectZeroes::for_mode(DetectZeroesMode::Off, true).is_none());
    }

    #[test]
    fn modes_parse_as_qemu_spells_them() {
        assert_eq!(DetectZeroesMode::parse("on").unwrap(), DetectZeroesMode::On);
        assert_eq!(
            DetectZeroesMode::parse("unmap").unwrap(),
            DetectZeroesMode::Unmap
        );
        assert_eq!(
            DetectZeroesMode::parse("off").unwrap(),
            DetectZeroesMode::Off
        );
        let e = DetectZeroesMode::parse("bogus").unwrap_err();
        assert!(
            e.to_string().contains("invalid parameter value: bogus"),
            "{e}"
        );
    }
}
