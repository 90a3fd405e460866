//! `vdisk`: a qemu-img compatible command line.
fn main() {
    eprintln!("vdisk: no subcommands yet");
    std::process::exit(1);
}
