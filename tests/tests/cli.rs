//! What a user sees when droptrace cannot run: one clear line, exit 1.
use std::{os::unix::process::CommandExt, process::Command};

use droptrace_tests::droptrace::binary;

fn stderr_of(command: &mut Command) -> (i32, String) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", binary().display()));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn a_pid_that_does_not_exist_is_refused_in_one_line() {
    let (code, stderr) = stderr_of(Command::new(binary()).args(["--pid", "999999999"]));
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "droptrace: error: --pid 999999999: no such process\n"
    );
}

#[test]
fn a_user_without_root_is_told_to_use_sudo() {
    // nobody may not reach the build's directory (a clone in a 0700 temp
    // dir): run a copy from a directory anyone can enter.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("droptrace-cli-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("droptrace");
    std::fs::copy(binary(), &copy).unwrap();
    let mut command = Command::new(&copy);
    // SAFETY: setuid in the child before exec; no allocation.
    unsafe {
        command.pre_exec(|| {
            if libc::geteuid() == 0 && (libc::setgid(65534) != 0 || libc::setuid(65534) != 0) {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (code, stderr) = stderr_of(&mut command);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("droptrace: error: droptrace loads eBPF programs and needs root"),
        "{stderr}"
    );
    assert!(stderr.contains("sudo"), "{stderr}");
}

#[test]
fn help_teaches_the_options_with_examples() {
    let output = Command::new(binary()).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for needle in [
        "--pid <PID>",
        "--json",
        "--duration <SECS>",
        "Examples:",
        "sudo droptrace --pid",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}
