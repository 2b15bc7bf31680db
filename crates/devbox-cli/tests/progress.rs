//! Progress bars are for terminals only: the long operations (snapshot export and import,
//! rollback, diff, image import) write no progress text when stderr is a pipe.

mod common;

use common::TestEnv;

/// No carriage returns, escape sequences or progress words: only what the command says.
fn assert_plain(what: &str, stderr: &[u8]) {
    let text = String::from_utf8_lossy(stderr);
    assert!(
        !text.contains('\r') && !text.contains('\x1b'),
        "{what}: {text:?}"
    );
    for word in ["exporting", "importing", "rolling back", "comparing"] {
        assert!(!text.contains(word), "{what}: {text:?}");
    }
}

#[test]
fn piped_output_has_no_progress_text() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    env.ok(&["create", "pg"]);
    env.ok(&["exec", "pg", "head -c 3000000 /dev/urandom > /work/blob"]);
    env.ok(&["snapshot", "pg", "one"]);
    let archive = env.root.path().join("one.tar.zst");
    let out = env.sb(&[
        "snapshot",
        "export",
        "pg",
        "one",
        "-o",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert_plain("export", &out.stderr);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.starts_with("wrote ") && said.lines().count() == 1,
        "{said:?}"
    );

    let out = env.sb(&[
        "snapshot",
        "import",
        archive.to_str().unwrap(),
        "--name",
        "pg2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_plain("import", &out.stderr);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pg2\n");

    env.ok(&["exec", "pg", "rm /work/blob"]);
    for args in [
        &["diff", "pg", "--from", "one"][..],
        &["rollback", "pg", "--to", "one"][..],
    ] {
        let out = env.sb(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_plain(args[0], &out.stderr);
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    env.ok(&["destroy", "-f", "pg", "pg2"]);
}
