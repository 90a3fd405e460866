//! `vdisk bitmap`: changes the persistent dirty bitmaps of an image, as `qemu-img
//! bitmap` (qemu-img 10): `--add [-g SIZE] [--disable]`, `--remove`, `--clear`,
//! `--enable`, `--disable`, `--merge SRC [-b FILE [-F FMT]]`, several actions per call,
//! applied in the order given; `-f`, `--image-opts`, `--object`.
//!
//! The arguments are parsed by hand: the actions' order matters and clap does not keep
//! the order of distinct flags.

use crate::common;
use vdisk::OpenOptions;

/// Arguments of `vdisk bitmap` (parsed in order by [`run`]).
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// `( --merge SOURCE | --add | --remove | --clear | --enable | --disable ).. [-f FMT |
    /// --image-opts] [-b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE] [--object OBJDEF]
    /// FILENAME BITMAP`
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

const USAGE: &str = "Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  vdisk bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP
";

#[derive(Debug, Clone, PartialEq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn op(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

#[derive(Default)]
struct Parsed {
    actions: Vec<Action>,
    format: Option<String>,
    image_opts: bool,
    granularity: Option<u64>,
    src_file: Option<String>,
    src_fmt: Option<String>,
    positional: Vec<String>,
}

fn parse(args: &[String]) -> Result<Option<Parsed>, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    let value = |i: &mut usize, inline: Option<String>, name: &str| -> Result<String, String> {
        if let Some(v) = inline {
            return Ok(v);
        }
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| format!("option '{name}' requires an argument"))
    };
    let mut only_positional = false;
    while i < args.len() {
        let a = args[i].clone();
        if only_positional || !a.starts_with('-') || a == "-" {
            p.positional.push(a);
            i += 1;
            continue;
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if a.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        // Short options may carry their value attached (`-gk64`, `-fqcow2`).
        let (name, inline) = if !name.starts_with("--") && name.len() > 2 {
            (name[..2].to_string(), Some(name[2..].to_string()))
        } else {
            (name, inline)
        };
        match name.as_str() {
            "--" => only_positional = true,
            "-h" | "--help" => {
                crate::outp!("{USAGE}");
                return Ok(None);
            }
            "--add" => p.actions.push(Action::Add),
            "--remove" => p.actions.push(Action::Remove),
            "--clear" => p.actions.push(Action::Clear),
            "--enable" => p.actions.push(Action::Enable),
            "--disable" => p.actions.push(Action::Disable),
            "--merge" => {
                let v = value(&mut i, inline, "--merge")?;
                p.actions.push(Action::Merge(v));
            }
            "-g" | "--granularity" => {
                let v = value(&mut i, inline, "--granularity")?;
                p.granularity = Some(
                    common::parse_size_arg(&v)
                        .filter(|&g| g > 0)
                        .ok_or_else(|| format!("Invalid granularity specified: '{v}'."))?,
                );
            }
            "-b" | "--source-file" => p.src_file = Some(value(&mut i, inline, "--source-file")?),
            "-F" | "--source-format" => p.src_fmt = Some(value(&mut i, inline, "--source-format")?),
            "-f" | "--format" => p.format = Some(value(&mut i, inline, "--format")?),
            "--image-opts" => p.image_opts = true,
            "--object" => {
                // Objects (secrets) only matter to encrypted images, which vdisk cannot
                // open yet: accepted and unused.
                value(&mut i, inline, "--object")?;
            }
            _ => {
                return Err(format!(
                    "unrecognized option '{a}'\nTry 'vdisk bitmap --help' for more info"
                ))
            }
        }
        i += 1;
    }
    Ok(Some(p))
}

/// Runs the subcommand; returns the exit code.
pub fn run(a: Args) -> i32 {
    common::exit_code(run_inner(a))
}

fn run_inner(a: Args) -> Result<(), String> {
    let Some(p) = parse(&a.args)? else {
        return Ok(());
    };
    if p.actions.is_empty() {
        return Err(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into(),
        );
    }
    if p.granularity.is_some() && !p.actions.contains(&Action::Add) {
        return Err("granularity only supported with --add".into());
    }
    if p.src_fmt.is_some() && p.src_file.is_none() {
        return Err("-F only supported with -b".into());
    }
    if p.src_file.is_some() && !p.actions.iter().any(|x| matches!(x, Action::Merge(_))) {
        return Err("Merge bitmap source file only supported with --merge".into());
    }
    if p.positional.len() != 2 {
        return Err("Expecting filename and bitmap name".into());
    }
    let (filename, bitmap) = (&p.positional[0], &p.positional[1]);
    let format = common::parse_format(p.format.as_deref())
        .map_err(|e| format!("Could not open '{filename}': {e}"))?;
    let img = common::open_image_with(
        filename,
        &OpenOptions {
            format,
            read_only: false,
            image_opts: p.image_opts,
            ..OpenOptions::default()
        },
    )?;
    let src = match &p.src_file {
        Some(f) => {
            let fmt = common::parse_format(p.src_fmt.as_deref())
                .map_err(|e| format!("Could not open '{f}': {e}"))?;
            Some(common::open_image_with(
                f,
                &OpenOptions {
                    format: fmt,
                    read_only: true,
                    ..OpenOptions::default()
                },
            )?)
        }
        None => None,
    };
    let mut result = Ok(());
    for act in &p.actions {
        let r = match act {
            Action::Add => img.add_bitmap(bitmap, p.granularity, true),
            Action::Remove => img.remove_bitmap(bitmap),
            Action::Clear => img.clear_bitmap(bitmap),
            Action::Enable => img.set_bitmap_enabled(bitmap, true),
            Action::Disable => img.set_bitmap_enabled(bitmap, false),
            Action::Merge(s) => img.merge_bitmap(bitmap, src.as_ref().unwrap_or(&img), s),
        };
        if let Err(e) = r {
            result = Err(format!(
                "Operation {} on bitmap {bitmap} failed: {e}",
                act.op()
            ));
            break;
        }
    }
    let closed = img.close().map_err(|e| e.to_string());
    result.and(closed)
}
