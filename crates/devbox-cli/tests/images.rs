//! Image import (rootfs tarball and directory, OCI layout, docker save), sharing, removal,
//! and hostile or corrupted archives.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{TestEnv, busybox_rootfs, tar_dir};
use sha2::{Digest, Sha256};

fn layer_tar(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_path(path).unwrap();
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn add_link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_path(path).unwrap();
    h.set_link_name(target).unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Two layers: busybox, then a layer that deletes /etc/motd and adds /etc/greeting.
fn image_layers() -> (Vec<u8>, Vec<u8>) {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let base = layer_tar(|b| {
        add_file(b, "bin/busybox", &busybox, 0o755);
        add_link(b, "bin/sh", "busybox");
        add_link(b, "bin/cat", "busybox");
        add_file(b, "etc/motd", b"old\n", 0o644);
        add_file(b, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644);
    });
    let top = layer_tar(|b| {
        add_file(b, "etc/.wh.motd", b"", 0o644);
        add_file(b, "etc/greeting", b"hello from layer 2\n", 0o644);
    });
    (base, top)
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "WorkingDir": "/etc"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// Writes an OCI image layout directory; returns its config digest.
fn oci_layout(dir: &Path) -> String {
    let (base, top) = image_layers();
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut layers = Vec::new();
    let diff_ids = vec![
        format!("sha256:{}", sha(&base)),
        format!("sha256:{}", sha(&top)),
    ];
    for l in [&base, &top] {
        let gz = gzip(l);
        std::fs::write(blobs.join(sha(&gz)), &gz).unwrap();
        layers.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", sha(&gz)), "size": gz.len()}));
    }
    let config = config_json(&diff_ids);
    std::fs::write(blobs.join(sha(&config)), &config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(&config)), "size": config.len()},
        "layers": layers,
    }))
    .unwrap();
    std::fs::write(blobs.join(sha(&manifest)), &manifest).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", sha(&manifest)), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "tiny:1"}}]}))
        .unwrap(),
    )
    .unwrap();
    sha(&config)
}

/// Writes a `docker save` archive; returns its config digest.
fn docker_archive(path: &Path) -> String {
    let (base, top) = image_layers();
    let diff_ids = vec![
        format!("sha256:{}", sha(&base)),
        format!("sha256:{}", sha(&top)),
    ];
    let mut config: serde_json::Value = serde_json::from_slice(&config_json(&diff_ids)).unwrap();
    config["docker_version"] = "24.0".into();
    let config = serde_json::to_vec(&config).unwrap();
    let cfg_name = format!("{}.json", sha(&config));
    let manifest = serde_json::to_vec(&serde_json::json!([{"Config": cfg_name, "RepoTags": ["legacy:latest"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}])).unwrap();
    let outer = layer_tar(|b| {
        add_file(b, "manifest.json", &manifest, 0o644);
        add_file(b, &cfg_name, &config, 0o644);
        add_file(b, "l1/layer.tar", &base, 0o644);
        add_file(b, "l2/layer.tar", &top, 0o644);
    });
    std::fs::write(path, outer).unwrap();
    sha(&config)
}

fn image_names(env: &TestEnv) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["image", "ls", "--format", "json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn rootfs_tarball_and_directory() {
    require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    busybox_rootfs(&work.join("rootfs"));
    let tarball = work.join("busybox.tar.gz");
    tar_dir(&work.join("rootfs"), &tarball);
    let out = env.ok(&["image", "import", tarball.to_str().unwrap(), "--name", "bb"]);
    assert!(out.starts_with("bb "), "{out}");
    env.ok(&["create", "one", "--image", "bb"]);
    env.ok(&["create", "two", "--image", "bb"]);
    assert_eq!(
        env.ok(&["exec", "one", "cat /etc/motd"]),
        "from the image\n"
    );
    env.ok(&["exec", "one", "echo changed > /etc/motd"]);
    assert_eq!(
        env.ok(&["exec", "two", "cat /etc/motd"]),
        "from the image\n",
        "images are shared read-only"
    );
    let listing = env.ok(&["image", "ls"]);
    assert!(
        listing.contains("bb") && listing.contains("one,two"),
        "{listing}"
    );

    // The same content imported again is stored once.
    let again = env.ok(&["image", "import", tarball.to_str().unwrap()]);
    assert!(again.starts_with("bb "), "{again}");

    // A directory.
    env.ok(&[
        "image",
        "import",
        work.join("rootfs").to_str().unwrap(),
        "--name",
        "bbdir",
    ]);
    env.ok(&["create", "three", "--image", "bbdir"]);
    assert_eq!(env.ok(&["exec", "three", "id -u"]), "0\n");

    // Removal is refused while a sandbox uses the image.
    let err = env.fails(&["image", "rm", "bb"]);
    assert!(err.contains("used by") && err.contains("one"), "{err}");
    env.ok(&["destroy", "one", "two"]);
    env.ok(&["image", "rm", "bb"]);
    assert!(!image_names(&env).contains(&"bb".to_string()));
    let stored = std::fs::read_dir(env.pool_dir().join("images"))
        .unwrap()
        .count();
    assert_eq!(stored, 2, "host and bbdir remain");
    let err = env.fails(&["image", "rm", "host"]);
    assert!(err.contains("built in"), "{err}");
}

#[test]
fn oci_layout_and_docker_save() {
    require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    let layout = work.join("layout");
    let id = oci_layout(&layout);
    let out = env.ok(&["image", "import", layout.to_str().unwrap()]);
    assert!(
        out.starts_with("tiny:1 ") && out.contains(&id[..12]),
        "{out}"
    );
    env.ok(&["create", "oci", "--image", "tiny:1"]);
    assert_eq!(
        env.ok(&["exec", "oci", "cat greeting"]),
        "hello from layer 2\n",
        "layers, whiteouts and WorkingDir apply"
    );
    let (code, _, _) = env.sh("oci", "cat /etc/motd");
    assert_ne!(code, 0, "the whiteout removed /etc/motd");
    assert_eq!(env.ok(&["exec", "oci", "echo $FROM_IMAGE"]), "yes\n");

    // The same layout as a tar archive is the same image.
    let archive = work.join("layout.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let out = env.ok(&["image", "import", archive.to_str().unwrap()]);
    assert!(out.contains(&id[..12]), "{out}");

    let saved = work.join("saved.tar");
    let docker_id = docker_archive(&saved);
    let out = env.ok(&["image", "import", saved.to_str().unwrap()]);
    assert!(
        out.starts_with("legacy:latest ") && out.contains(&docker_id[..12]),
        "{out}"
    );
    env.ok(&["create", "legacy", "--image", "legacy:latest"]);
    assert_eq!(
        env.ok(&["exec", "legacy", "cat /etc/greeting"]),
        "hello from layer 2\n"
    );
}

#[test]
fn hostile_and_corrupted_archives_change_nothing() {
    require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let outside = env.root.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let before = image_names(&env);

    let raw_entry = |b: &mut tar::Builder<Vec<u8>>, name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "absolute",
            layer_tar(|b| raw_entry(b, "/tmp/devbox-hostile-abs")),
        ),
        (
            "dotdot",
            layer_tar(|b| raw_entry(b, "etc/../../devbox-hostile-dotdot")),
        ),
        (
            "symlink",
            layer_tar(|b| {
                add_link(b, "escape", outside.to_str().unwrap());
                add_file(b, "escape/pwned", b"x", 0o644);
            }),
        ),
        (
            "device",
            layer_tar(|b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Block);
                h.set_size(0);
                h.set_path("etc/disk").unwrap();
                h.set_device_major(8).unwrap();
                h.set_device_minor(0).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }),
        ),
    ];
    for (what, data) in cases {
        let path = work.join(format!("{what}.tar"));
        std::fs::write(&path, data).unwrap();
        let err = env.fails(&["image", "import", path.to_str().unwrap()]);
        assert!(err.contains("refusing archive entry"), "{what}: {err}");
    }
    assert!(!Path::new("/tmp/devbox-hostile-abs").exists());
    assert!(!env.root.path().join("devbox-hostile-dotdot").exists());
    assert!(!outside.join("pwned").exists());

    // A corrupted blob in an OCI layout.
    let layout = work.join("corrupt");
    oci_layout(&layout);
    let blobs: Vec<PathBuf> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let biggest = blobs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut data = std::fs::read(biggest).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(biggest, data).unwrap();
    let err = env.fails(&["image", "import", layout.to_str().unwrap()]);
    assert!(err.contains("corrupted"), "{err}");

    let err = env.fails(&["image", "import", "/nonexistent/image.tar"]);
    assert!(err.contains("does not exist"), "{err}");

    assert_eq!(image_names(&env), before, "nothing was added");
    assert_eq!(
        std::fs::read_dir(env.pool_dir().join("staging"))
            .unwrap()
            .count(),
        0,
        "no leftovers"
    );
    assert_eq!(
        std::fs::read_dir(env.pool_dir().join("images"))
            .unwrap()
            .count(),
        1,
        "only the host image"
    );
}
