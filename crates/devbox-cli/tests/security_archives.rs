//! Archives against a hostile author (issue 9: findings 4, 5, 7, and the limits part of 8).
//!
//! What an archive's author may try: members of an image archive that are symlinks or hard
//! links to a host file holding a secret (layer.tar, manifest.json, the config, blobs, index.json,
//! a linked directory above them), absolute and `..` names, in archives and in layout
//! directories; layers beyond the config's diff ids, a layer whose content is not its diff id,
//! a config without diff ids, a doctored archive imported before the genuine one; sparse bombs
//! (a tiny archive holding a 10 GiB file) in snapshot archives on both drivers, in rootfs
//! tarballs, OCI layouts and docker archives; archives over `DEVBOX_IMPORT_MAX_BYTES`; limits
//! in a snapshot archive beyond what `create` accepts. Each is refused with nothing changed;
//! a legitimate sparse file stays sparse through export and import. From a hostile review:
//! names and link targets over PATH_MAX (held in memory by the import), data after a
//! layer's end marker (64 MiB of zeros in a few KiB), skipped data of non-file entries,
//! a snapshot's layer.tar or manifest.json larger than they may be, OCI descriptor sizes,
//! docker configs not named by their digest, and entries written through in-tree symlinks
//! (chains of links included), while a later layer may still replace a link by a directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

mod common;

use common::TestEnv;

// ---- archive builders ----

fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

/// An entry written raw: any name (absolute, `..`), any link target.
fn raw(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    raw(b, tar::EntryType::Regular, name, "", data);
}

fn symlink(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    raw(b, tar::EntryType::Symlink, name, target, b"");
}

fn hardlink(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    raw(b, tar::EntryType::Link, name, target, b"");
}

/// A base-256 tar number.
fn num(field: &mut [u8], v: u64) {
    field.fill(0);
    field[0] = 0x80;
    let n = field.len();
    field[n - 8..].copy_from_slice(&v.to_be_bytes());
}

/// A GNU sparse entry of `apparent` bytes whose only data, `data`, ends the file: a tiny
/// archive entry for a huge file.
fn sparse(b: &mut tar::Builder<Vec<u8>>, path: &str, apparent: u64, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(data.len() as u64);
    let g = h.as_gnu_mut().unwrap();
    num(&mut g.realsize, apparent);
    num(&mut g.sparse[0].offset, apparent - data.len() as u64);
    num(&mut g.sparse[0].numbytes, data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

const BOMB: u64 = 10 << 30;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn busybox_layer(motd: &[u8]) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    tar_with(|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(busybox.len() as u64);
        h.set_mode(0o755);
        b.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
        for app in ["sh", "cat", "test", "ls", "du", "tail"] {
            symlink(b, &format!("bin/{app}"), "busybox");
        }
        file(b, "etc/motd", motd);
    })
}

fn greeting_layer(text: &[u8]) -> Vec<u8> {
    tar_with(|b| file(b, "etc/greeting", text))
}

fn config(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

fn diff_ids(layers: &[&Vec<u8>]) -> Vec<String> {
    layers
        .iter()
        .map(|l| format!("sha256:{}", sha(l)))
        .collect()
}

/// Members of an OCI layout: (name, bytes), for the given config and layer blobs (gzip'd).
fn oci_members(config: &[u8], layers: &[&Vec<u8>]) -> (Vec<(String, Vec<u8>)>, String) {
    let mut out = vec![(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut descs = Vec::new();
    for l in layers {
        let gz = gzip(l);
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", sha(&gz)), "size": gz.len()}));
        out.push((format!("blobs/sha256/{}", sha(&gz)), gz));
    }
    out.push((format!("blobs/sha256/{}", sha(config)), config.to_vec()));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(config)), "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    out.push((format!("blobs/sha256/{}", sha(&manifest)), manifest.clone()));
    out.push((
        "index.json".into(),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", sha(&manifest)), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "probe:1"}}]}))
        .unwrap(),
    ));
    (out, sha(config))
}

fn write_dir(dir: &Path, members: &[(String, Vec<u8>)]) {
    for (n, data) in members {
        let p = dir.join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

/// A `docker save` archive: manifest.json listing `layer_names`, the config, then `extra`.
fn docker_save(
    config: &[u8],
    layer_names: &[&str],
    extra: impl FnOnce(&mut tar::Builder<Vec<u8>>),
) -> Vec<u8> {
    let cfg_name = format!("{}.json", sha(config));
    let manifest = serde_json::to_vec(&serde_json::json!([{"Config": cfg_name, "RepoTags": ["probe:latest"], "Layers": layer_names}])).unwrap();
    tar_with(|b| {
        file(b, "manifest.json", &manifest);
        file(b, &cfg_name, config);
        extra(b);
    })
}

/// A snapshot archive (`dev-box.snapshot/v1`) around `layer`, with the spec `spec`.
fn snapshot_archive(layer: &[u8], spec: serde_json::Value) -> Vec<u8> {
    let manifest = serde_json::json!({
        "format": "dev-box.snapshot/v1",
        "snapshot": {"name": "s", "created_at": "2026-01-01T00:00:00Z", "message": null, "labels": {}},
        "sandbox": {"name": "probe", "manifest": {"apiVersion": "sandbox.io/v1", "kind": "Sandbox", "spec": spec}},
        "image": {"id": "host", "name": "host"},
        "layer": {"digest": format!("sha256:{}", sha(layer)), "size": layer.len()},
    });
    let json = serde_json::to_vec(&manifest).unwrap();
    let outer = tar_with(|b| {
        file(b, "manifest.json", &json);
        file(b, "layer.tar", layer);
    });
    zstd::encode_all(&outer[..], 3).unwrap()
}

// ---- observations ----

fn image_names(env: &TestEnv) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["image", "ls", "--format", "json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Bytes used on the pool's filesystem.
fn pool_used(env: &TestEnv) -> u64 {
    let s = nix::sys::statvfs::statvfs(&env.pool_dir()).unwrap();
    (s.blocks() - s.blocks_free()) * s.fragment_size()
}

/// What must hold after a refused import: no image, sandbox or leftover was added.
struct Unchanged {
    images: Vec<String>,
    sandboxes: String,
    stored_images: usize,
    stored_sandboxes: usize,
    used: u64,
}

impl Unchanged {
    fn now(env: &TestEnv) -> Self {
        Self {
            images: image_names(env),
            sandboxes: env.ok(&["ls", "-q"]),
            stored_images: count(&env.pool_dir().join("images")),
            stored_sandboxes: count(&env.pool_dir().join("sandboxes")),
            used: pool_used(env),
        }
    }

    fn check(&self, env: &TestEnv, what: &str) {
        assert_eq!(image_names(env), self.images, "{what}: no image added");
        assert_eq!(
            env.ok(&["ls", "-q"]),
            self.sandboxes,
            "{what}: no sandbox added"
        );
        assert_eq!(
            count(&env.pool_dir().join("images")),
            self.stored_images,
            "{what}"
        );
        assert_eq!(
            count(&env.pool_dir().join("sandboxes")),
            self.stored_sandboxes,
            "{what}"
        );
        assert_eq!(
            count(&env.pool_dir().join("staging")),
            0,
            "{what}: no leftovers"
        );
        let used = pool_used(env);
        assert!(
            used < self.used + (32 << 20),
            "{what}: the pool grew from {} to {used} bytes",
            self.used
        );
    }
}

fn import_fails(env: &TestEnv, path: &Path) -> String {
    env.fails(&["image", "import", path.to_str().unwrap()])
}

// ---- finding 4: links in image archives ----

/// Spoils a layout directory.
type Spoil<'a> = Box<dyn Fn(&Path) + 'a>;

#[test]
fn links_in_image_archives_never_reach_host_files() {
    crate::require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    let host = env.root.path().join("host");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(host.join("dir")).unwrap();
    // Host files an attacker would like imported: a layer holding a secret (its digest is
    // known to the attacker, the worst case), the same as a gzip'd blob, a manifest.
    let secret_layer = tar_with(|b| file(b, "etc/stolen", b"TOP SECRET\n"));
    let secret_tar = host.join("secret.tar");
    std::fs::write(&secret_tar, &secret_layer).unwrap();
    std::fs::write(host.join("dir/layer.tar"), &secret_layer).unwrap();
    let secret_gz = gzip(&secret_layer);
    let secret_blob = host.join("secret.blob");
    std::fs::write(&secret_blob, &secret_gz).unwrap();
    let abs = secret_tar.to_str().unwrap().to_string();
    let up = format!("../../../../../../../../..{abs}");
    let cfg = config(&diff_ids(&[&secret_layer]));
    let cfg_name = format!("{}.json", sha(&cfg));
    std::fs::write(host.join("config.json"), &cfg).unwrap();
    let host_manifest = host.join("manifest.json");
    std::fs::write(
        &host_manifest,
        serde_json::to_vec(&serde_json::json!([{"Config": cfg_name, "Layers": [abs]}])).unwrap(),
    )
    .unwrap();
    let before = Unchanged::now(&env);

    let l = ["l1/layer.tar"];
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        (
            "docker: layer.tar symlink, absolute".into(),
            docker_save(&cfg, &l, |b| symlink(b, l[0], &abs)),
        ),
        (
            "docker: layer.tar symlink, relative".into(),
            docker_save(&cfg, &l, |b| symlink(b, l[0], &up)),
        ),
        (
            "docker: layer.tar hard link, absolute".into(),
            docker_save(&cfg, &l, |b| hardlink(b, l[0], &abs)),
        ),
        (
            "docker: layer.tar hard link, relative".into(),
            docker_save(&cfg, &l, |b| hardlink(b, l[0], &up)),
        ),
        (
            "docker: layer's directory a symlink".into(),
            docker_save(&cfg, &l, |b| {
                symlink(b, "l1", host.join("dir").to_str().unwrap())
            }),
        ),
        (
            "docker: symlink chain".into(),
            docker_save(&cfg, &l, |b| {
                symlink(b, "l1/layer.tar", "../hop");
                symlink(b, "hop", &abs);
            }),
        ),
        (
            "docker: manifest.json symlink".into(),
            tar_with(|b| {
                symlink(b, "manifest.json", host_manifest.to_str().unwrap());
                file(b, "secret.tar", &secret_layer);
            }),
        ),
        (
            "docker: manifest.json hard link".into(),
            tar_with(|b| {
                hardlink(b, "manifest.json", host_manifest.to_str().unwrap());
            }),
        ),
        ("docker: config symlink".into(), {
            let manifest = serde_json::to_vec(
                &serde_json::json!([{"Config": "c.json", "Layers": ["l1/layer.tar"]}]),
            )
            .unwrap();
            tar_with(|b| {
                file(b, "manifest.json", &manifest);
                symlink(b, "c.json", host.join("config.json").to_str().unwrap());
                file(b, "l1/layer.tar", &secret_layer);
            })
        }),
        (
            "docker: layer named with ..".into(),
            docker_save(&cfg, &[&up], |_| {}),
        ),
        (
            "docker: layer named absolutely".into(),
            docker_save(&cfg, &[&abs], |_| {}),
        ),
        (
            "docker: entry named with ..".into(),
            docker_save(&cfg, &l, |b| file(b, "../../escape", b"x")),
        ),
        (
            "docker: entry named absolutely".into(),
            docker_save(&cfg, &l, |b| file(b, "/tmp/devbox-abs-escape", b"x")),
        ),
        // The original finding: a symlinked layer.tar and a config without diff ids.
        (
            "docker: symlink and no diff ids".into(),
            docker_save(&config(&[]), &l, |b| symlink(b, l[0], &abs)),
        ),
    ];
    // OCI archives whose blobs (or index.json) are links to host files.
    let (members, _) = oci_members(&cfg, &[&secret_layer]);
    let blob_name = format!("blobs/sha256/{}", sha(&secret_gz));
    let oci = |replace: &str, how: &dyn Fn(&mut tar::Builder<Vec<u8>>, &str)| {
        tar_with(|b| {
            for (n, data) in &members {
                if n == replace {
                    how(b, n);
                } else {
                    file(b, n, data);
                }
            }
        })
    };
    let blob_abs = secret_blob.to_str().unwrap().to_string();
    cases.push((
        "oci: blob symlink".into(),
        oci(&blob_name, &|b, n| symlink(b, n, &blob_abs)),
    ));
    cases.push((
        "oci: blob hard link".into(),
        oci(&blob_name, &|b, n| hardlink(b, n, &blob_abs)),
    ));
    cases.push((
        "oci: index.json symlink".into(),
        oci("index.json", &|b, n| symlink(b, n, &abs)),
    ));
    cases.push((
        "oci: blobs directory symlink".into(),
        tar_with(|b| {
            for (n, data) in &members {
                if !n.starts_with("blobs/") {
                    file(b, n, data);
                }
            }
            symlink(b, "blobs", host.to_str().unwrap());
        }),
    ));
    for (i, (what, data)) in cases.iter().enumerate() {
        let path = work.join(format!("case-{i}.tar"));
        std::fs::write(&path, data).unwrap();
        let err = import_fails(&env, &path);
        // The original finding is refused before its layer is even opened: nothing vouches
        // for it.
        let refused =
            err.contains("refusing archive entry") || err.contains("layers cannot be verified");
        assert!(refused, "{what}: {err}");
        before.check(&env, what);
    }

    // Layout directories whose members are links to host files.
    let dir_cases: Vec<(&str, Spoil<'_>)> = vec![
        (
            "dir: blob symlink",
            Box::new(|d: &Path| {
                std::fs::remove_file(d.join(&blob_name)).unwrap();
                std::os::unix::fs::symlink(&secret_blob, d.join(&blob_name)).unwrap();
            }),
        ),
        (
            "dir: blob hard link",
            Box::new(|d: &Path| {
                std::fs::remove_file(d.join(&blob_name)).unwrap();
                std::fs::hard_link(&secret_blob, d.join(&blob_name)).unwrap();
            }),
        ),
        (
            "dir: blobs/sha256 symlink",
            Box::new(|d: &Path| {
                let real = d.join("real-blobs");
                std::fs::rename(d.join("blobs/sha256"), &real).unwrap();
                std::os::unix::fs::symlink(&real, d.join("blobs/sha256")).unwrap();
            }),
        ),
        (
            "dir: index.json symlink",
            Box::new(|d: &Path| {
                let copy = host.join(format!("index-{}.json", std::process::id()));
                std::fs::rename(d.join("index.json"), &copy).unwrap();
                std::os::unix::fs::symlink(&copy, d.join("index.json")).unwrap();
            }),
        ),
    ];
    for (i, (what, spoil)) in dir_cases.iter().enumerate() {
        let dir = work.join(format!("layout-{i}"));
        write_dir(&dir, &members);
        spoil(&dir);
        let err = import_fails(&env, &dir);
        assert!(err.contains("refusing archive entry"), "{what}: {err}");
        before.check(&env, what);
    }
    assert!(!Path::new("/tmp/devbox-abs-escape").exists());
    assert!(!env.root.path().join("escape").exists());
    // The host files are untouched.
    assert_eq!(std::fs::read(&secret_tar).unwrap(), secret_layer);

    // A link between two members of the archive itself is only an alias (docker writes these
    // for a layer it already saved): allowed, and verified like any member.
    let bb = busybox_layer(b"shared\n");
    let cfg2 = config(&diff_ids(&[&bb, &bb]));
    let aliased = work.join("aliased.tar");
    std::fs::write(
        &aliased,
        docker_save(&cfg2, &["a/layer.tar", "b/layer.tar"], |b| {
            file(b, "a/layer.tar", &bb);
            symlink(b, "b/layer.tar", "../a/layer.tar");
        }),
    )
    .unwrap();
    env.ok(&[
        "image",
        "import",
        aliased.to_str().unwrap(),
        "--name",
        "aliased",
    ]);
    env.ok(&["create", "al", "--image", "aliased"]);
    assert_eq!(env.ok(&["exec", "al", "cat /etc/motd"]), "shared\n");
}

// ---- finding 5: every layer verified, identity from verified content ----

#[test]
fn layers_are_verified_and_a_doctored_image_cannot_squat_a_genuine_id() {
    crate::require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let base = busybox_layer(b"genuine motd\n");
    let top = greeting_layer(b"genuine greeting\n");
    let evil = tar_with(|b| {
        file(b, "etc/greeting", b"doctored greeting\n");
        file(b, "etc/pwned", b"doctored\n");
    });
    let genuine_cfg = config(&diff_ids(&[&base, &top]));
    let genuine_id = sha(&genuine_cfg);
    let before = Unchanged::now(&env);

    let write_oci = |name: &str, members: &[(String, Vec<u8>)]| -> PathBuf {
        let path = work.join(name);
        std::fs::write(
            &path,
            tar_with(|b| {
                for (n, d) in members {
                    file(b, n, d);
                }
            }),
        )
        .unwrap();
        path
    };
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "oci: a layer beyond the diff ids (the genuine config)",
            write_oci(
                "beyond.tar",
                &oci_members(&genuine_cfg, &[&base, &top, &evil]).0,
            ),
            "every layer must be named",
        ),
        (
            "oci: a layer whose content is not its diff id",
            write_oci("swapped.tar", &oci_members(&genuine_cfg, &[&base, &evil]).0),
            "does not match rootfs.diff_ids[1]",
        ),
        (
            "oci: a config without diff ids",
            write_oci("no-ids.tar", &oci_members(&config(&[]), &[&base, &evil]).0),
            "cannot be verified",
        ),
        (
            "docker: a layer beyond the diff ids",
            {
                let p = work.join("d-beyond.tar");
                std::fs::write(
                    &p,
                    docker_save(
                        &genuine_cfg,
                        &["a/layer.tar", "b/layer.tar", "c/layer.tar"],
                        |b| {
                            file(b, "a/layer.tar", &base);
                            file(b, "b/layer.tar", &top);
                            file(b, "c/layer.tar", &evil);
                        },
                    ),
                )
                .unwrap();
                p
            },
            "every layer must be named",
        ),
        (
            "docker: a layer whose content is not its diff id",
            {
                let p = work.join("d-swapped.tar");
                std::fs::write(
                    &p,
                    docker_save(&genuine_cfg, &["a/layer.tar", "b/layer.tar"], |b| {
                        file(b, "a/layer.tar", &base);
                        file(b, "b/layer.tar", &evil);
                    }),
                )
                .unwrap();
                p
            },
            "does not match rootfs.diff_ids[1]",
        ),
        (
            "docker: a config without diff ids",
            {
                let p = work.join("d-no-ids.tar");
                std::fs::write(
                    &p,
                    docker_save(&config(&[]), &["a/layer.tar"], |b| {
                        file(b, "a/layer.tar", &evil);
                    }),
                )
                .unwrap();
                p
            },
            "cannot be verified",
        ),
    ];
    for (what, path, says) in &cases {
        let err = import_fails(&env, path);
        assert!(
            err.contains("corrupted") && err.contains(says),
            "{what}: {err}"
        );
        before.check(&env, what);
    }

    // The genuine image, imported after every doctored attempt, is the genuine content.
    let genuine = write_oci("genuine.tar", &oci_members(&genuine_cfg, &[&base, &top]).0);
    let out = env.ok(&[
        "image",
        "import",
        genuine.to_str().unwrap(),
        "--name",
        "genuine",
    ]);
    assert!(out.contains(&genuine_id[..12]), "{out}");
    // Once more, as a docker archive of the same config: the same id, the same content.
    let saved = work.join("genuine-docker.tar");
    std::fs::write(
        &saved,
        docker_save(&genuine_cfg, &["a/layer.tar", "b/layer.tar"], |b| {
            file(b, "a/layer.tar", &base);
            file(b, "b/layer.tar", &top);
        }),
    )
    .unwrap();
    let out = env.ok(&["image", "import", saved.to_str().unwrap()]);
    assert!(out.contains(&genuine_id[..12]), "{out}");
    env.ok(&["create", "g", "--image", "genuine"]);
    assert_eq!(
        env.ok(&["exec", "g", "cat /etc/greeting"]),
        "genuine greeting\n"
    );
    let (code, _, _) = env.sh("g", "test -e /etc/pwned");
    assert_ne!(code, 0, "no doctored file");
}

// ---- finding 7: sizes bounded before writing; sparse files stay sparse ----

fn sparse_bomb_layer() -> Vec<u8> {
    tar_with(|b| {
        raw(b, tar::EntryType::Directory, "work/", "", b"");
        sparse(b, "work/bomb", BOMB, b"boom");
    })
}

fn snapshot_bomb_refused(env: TestEnv) {
    let archive = env.root.path().join("bomb.tar.zst");
    std::fs::write(
        &archive,
        snapshot_archive(&sparse_bomb_layer(), serde_json::json!({})),
    )
    .unwrap();
    assert!(
        std::fs::metadata(&archive).unwrap().len() < 2048,
        "a tiny archive"
    );
    let before = Unchanged::now(&env);
    let err = env.fails(&[
        "snapshot",
        "import",
        archive.to_str().unwrap(),
        "--name",
        "bomb",
    ]);
    assert!(err.contains("work/bomb") && err.contains("pool"), "{err}");
    before.check(&env, "snapshot sparse bomb");
}

#[test]
fn snapshot_sparse_bomb_btrfs() {
    crate::require_root!();
    snapshot_bomb_refused(TestEnv::new());
}

#[test]
fn snapshot_sparse_bomb_copy_driver() {
    crate::require_root!();
    // The copy driver on a filesystem of its own, so "the host disk" is measurable.
    snapshot_bomb_refused(TestEnv::copy_driver_sized("1G"));
}

#[test]
fn image_sparse_bombs_are_refused_before_writing() {
    crate::require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let before = Unchanged::now(&env);
    let bomb = tar_with(|b| sparse(b, "bomb", BOMB, b"boom"));
    let bb = busybox_layer(b"x\n");
    let cfg = config(&diff_ids(&[&bb, &bomb]));
    let mut cases: Vec<(&str, PathBuf)> = Vec::new();
    let p = work.join("rootfs.tar");
    std::fs::write(&p, &bomb).unwrap();
    cases.push(("rootfs tarball", p));
    let p = work.join("rootfs.tar.zst");
    std::fs::write(&p, zstd::encode_all(&bomb[..], 3).unwrap()).unwrap();
    cases.push(("zstd rootfs tarball", p));
    let p = work.join("layout");
    write_dir(&p, &oci_members(&cfg, &[&bb, &bomb]).0);
    cases.push(("OCI layout directory, bomb in a layer", p));
    let p = work.join("docker.tar");
    std::fs::write(
        &p,
        docker_save(&cfg, &["a/layer.tar", "b/layer.tar"], |b| {
            file(b, "a/layer.tar", &bb);
            file(b, "b/layer.tar", &bomb);
        }),
    )
    .unwrap();
    cases.push(("docker archive, bomb in a layer", p));
    let p = work.join("docker-blob.tar");
    std::fs::write(
        &p,
        docker_save(&cfg, &["a/layer.tar"], |b| {
            sparse(b, "a/layer.tar", BOMB, b"x")
        }),
    )
    .unwrap();
    cases.push(("docker archive, the layer member itself sparse", p));
    for (what, path) in &cases {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let err = import_fails(&env, path);
        assert!(
            err.contains("refusing archive entry") && err.contains("pool"),
            "{what} ({size} bytes): {err}"
        );
        before.check(&env, what);
    }
}

#[test]
fn the_import_cap_is_configurable() {
    crate::require_root!();
    let mut env = TestEnv::new();
    env.restart_with_env("DEVBOX_IMPORT_MAX_BYTES", "16M");
    let work = env.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let before = Unchanged::now(&env);
    let dense = tar_with(|b| file(b, "work/big", &vec![1u8; 32 << 20]));
    let p = work.join("big.tar.gz");
    std::fs::write(&p, gzip(&dense)).unwrap();
    let err = import_fails(&env, &p);
    assert!(err.contains("DEVBOX_IMPORT_MAX_BYTES"), "{err}");
    before.check(&env, "image over the cap");
    let a = work.join("big.tar.zst");
    std::fs::write(&a, snapshot_archive(&dense, serde_json::json!({}))).unwrap();
    let err = env.fails(&["snapshot", "import", a.to_str().unwrap(), "--name", "big"]);
    assert!(err.contains("DEVBOX_IMPORT_MAX_BYTES"), "{err}");
    before.check(&env, "snapshot over the cap");
    // Under the cap, the same kind of archive imports.
    let small = tar_with(|b| file(b, "work/small", &vec![1u8; 1 << 20]));
    let a = work.join("small.tar.zst");
    std::fs::write(&a, snapshot_archive(&small, serde_json::json!({}))).unwrap();
    env.ok(&["snapshot", "import", a.to_str().unwrap(), "--name", "small"]);
    // A value that is not a size says so.
    env.restart_with_env("DEVBOX_IMPORT_MAX_BYTES", "lots");
    let err = import_fails(&env, &p);
    assert!(
        err.contains("DEVBOX_IMPORT_MAX_BYTES") && err.contains("not a size"),
        "{err}"
    );
}

fn sparse_round_trip(env: TestEnv) {
    env.ok(&["create", "src"]);
    env.ok(&[
        "exec",
        "src",
        "mkdir -p /work && truncate -s 256M /work/big && echo tail >> /work/big",
    ]);
    env.ok(&["snapshot", "src", "ship"]);
    let archive = env.root.path().join("sparse.tar.zst");
    env.ok(&[
        "snapshot",
        "export",
        "src",
        "ship",
        "-o",
        archive.to_str().unwrap(),
    ]);
    assert!(
        std::fs::metadata(&archive).unwrap().len() < 4 << 20,
        "the archive is small"
    );
    let used = pool_used(&env);
    env.ok(&[
        "snapshot",
        "import",
        archive.to_str().unwrap(),
        "--name",
        "dst",
        "--start",
    ]);
    assert_eq!(
        env.ok(&["exec", "dst", "stat -c %s /work/big"]).trim(),
        ((256u64 << 20) + 5).to_string()
    );
    assert_eq!(env.ok(&["exec", "dst", "tail -c 5 /work/big"]), "tail\n");
    let kib: u64 = env
        .ok(&["exec", "dst", "du -k /work/big"])
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        kib < 1024,
        "the imported file is sparse ({kib} KiB on disk)"
    );
    assert!(
        pool_used(&env) < used + (64 << 20),
        "the import did not cost the apparent size"
    );
    assert_eq!(
        count(&env.pool_dir().join("staging")),
        0,
        "export and import leave nothing"
    );
}

#[test]
fn sparse_files_stay_sparse_btrfs() {
    crate::require_root!();
    sparse_round_trip(TestEnv::new());
}

#[test]
fn sparse_files_stay_sparse_copy_driver() {
    crate::require_root!();
    // A filesystem of its own: the pool's use is measured, and other tests write to /tmp.
    sparse_round_trip(TestEnv::copy_driver_sized("1G"));
}

// ---- finding 8 (part): imported limits ----

#[test]
fn imported_limits_beyond_the_daemons_range_are_refused() {
    crate::require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "src"]);
    env.ok(&["exec", "src", "mkdir -p /work && echo hi > /work/f"]);
    env.ok(&["snapshot", "src", "s"]);
    let exported = env.root.path().join("real.tar.zst");
    env.ok(&[
        "snapshot",
        "export",
        "src",
        "s",
        "-o",
        exported.to_str().unwrap(),
    ]);
    // Rewrite the real archive's spec.
    let outer = zstd::decode_all(&std::fs::read(&exported).unwrap()[..]).unwrap();
    let mut members = Vec::new();
    for e in tar::Archive::new(&outer[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        members.push((name, data));
    }
    let rewrite = |limits: serde_json::Value, layer_first: bool| -> PathBuf {
        let mut m: serde_json::Value = serde_json::from_slice(&members[0].1).unwrap();
        m["sandbox"]["manifest"]["spec"]["limits"] = limits.clone();
        let json = serde_json::to_vec(&m).unwrap();
        let mut order = vec![("manifest.json", json), ("layer.tar", members[1].1.clone())];
        if layer_first {
            order.reverse();
        }
        let path = env.root.path().join(format!(
            "rewritten-{}.tar.zst",
            sha(limits.to_string().as_bytes())
        ));
        let outer = tar_with(|b| {
            for (n, d) in &order {
                file(b, n, d);
            }
        });
        std::fs::write(&path, zstd::encode_all(&outer[..], 3).unwrap()).unwrap();
        path
    };
    assert_eq!(members[0].0, "manifest.json");
    let before = Unchanged::now(&env);
    for (limits, field, range) in [
        (
            serde_json::json!({"memory": "512Ti"}),
            "spec.limits.memory",
            "4Mi to 1Ti",
        ),
        (
            serde_json::json!({"memory": "1Mi"}),
            "spec.limits.memory",
            "at least 4Mi",
        ),
        (
            serde_json::json!({"cpu": "100000"}),
            "spec.limits.cpu",
            "10m to 1024",
        ),
        (
            serde_json::json!({"pids": 1_000_000_000_000u64}),
            "spec.limits.pids",
            "2 to 4194304",
        ),
    ] {
        let path = rewrite(limits.clone(), false);
        let err = env.fails(&[
            "snapshot",
            "import",
            path.to_str().unwrap(),
            "--name",
            "imp",
        ]);
        assert!(
            err.contains(field) && err.contains(range),
            "{limits}: {err}"
        );
        before.check(&env, &limits.to_string());
    }
    // The same range as create's.
    let err = env.fails(&["create", "huge", "--memory", "512Ti"]);
    assert!(
        err.contains("spec.limits.memory") && err.contains("4Mi to 1Ti"),
        "{err}"
    );
    // A layer before its manifest is refused (the manifest is checked before any writing).
    let path = rewrite(serde_json::json!({"memory": "64Mi"}), true);
    let err = env.fails(&[
        "snapshot",
        "import",
        path.to_str().unwrap(),
        "--name",
        "imp",
    ]);
    assert!(err.contains("before manifest.json"), "{err}");
    before.check(&env, "layer first");
    // Limits within the range import.
    let path = rewrite(
        serde_json::json!({"memory": "64Mi", "cpu": "1", "pids": 100}),
        false,
    );
    env.ok(&[
        "snapshot",
        "import",
        path.to_str().unwrap(),
        "--name",
        "imp",
    ]);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "imp"])).unwrap();
    assert_eq!(info["limits"]["memory_bytes"], 64u64 << 20, "{info}");
}

// ---- a hostile review: names held in memory, inflation beyond what is written, links in
// the extracted tree ----

/// A tar of `n` symlinks whose names and targets are `len` bytes long (GNU long names).
fn long_named_links(n: usize, len: usize) -> Vec<u8> {
    tar_with(|b| {
        for i in 0..n {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            let name = format!("{i}-{}", "n".repeat(len));
            b.append_link(&mut h, &name, "t".repeat(len)).unwrap();
        }
    })
}

/// `layer` followed by `zeros` bytes of zeros, which a diff id of the result covers.
fn with_zeros(layer: &[u8], zeros: usize) -> Vec<u8> {
    let mut v = layer.to_vec();
    v.extend(std::iter::repeat_n(0u8, zeros));
    v
}

#[test]
fn names_longer_than_path_max_are_refused_before_they_are_kept() {
    crate::require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let before = Unchanged::now(&env);
    let links = long_named_links(200, 5000);
    let bb = busybox_layer(b"x\n");
    let mut cases: Vec<(&str, PathBuf)> = Vec::new();
    // Members of the archive itself (the table of links an image archive keeps).
    let cfg = config(&diff_ids(&[&bb]));
    let p = work.join("docker-links.tar.zst");
    let archive = docker_save(&cfg, &["a/layer.tar"], |b| {
        file(b, "a/layer.tar", &bb);
        for i in 0..200 {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, format!("l{i}-{}", "n".repeat(5000)), "a/layer.tar")
                .unwrap();
        }
    });
    std::fs::write(&p, zstd::encode_all(&archive[..], 19).unwrap()).unwrap();
    cases.push(("docker archive with long member names", p));
    // In a layer, and in a rootfs tarball.
    let cfg = config(&diff_ids(&[&bb, &links]));
    let p = work.join("docker-layer.tar");
    std::fs::write(
        &p,
        docker_save(&cfg, &["a/layer.tar", "b/layer.tar"], |b| {
            file(b, "a/layer.tar", &bb);
            file(b, "b/layer.tar", &links);
        }),
    )
    .unwrap();
    cases.push(("docker archive, long names in a layer", p));
    let p = work.join("layout");
    write_dir(&p, &oci_members(&cfg, &[&bb, &links]).0);
    cases.push(("OCI layout, long names in a layer", p));
    let p = work.join("rootfs.tar.gz");
    std::fs::write(&p, gzip(&links)).unwrap();
    cases.push(("rootfs tarball", p));
    for (what, path) in &cases {
        let err = import_fails(&env, path);
        assert!(
            err.contains("refusing archive entry") && err.contains("4096"),
            "{what}: {err}"
        );
        assert!(
            err.len() < 4000,
            "{what}: the error names the entry briefly"
        );
        before.check(&env, what);
    }
    // A snapshot's layer.
    let a = work.join("snap.tar.zst");
    std::fs::write(&a, snapshot_archive(&links, serde_json::json!({}))).unwrap();
    let err = env.fails(&["snapshot", "import", a.to_str().unwrap(), "--name", "ln"]);
    assert!(err.contains("4096"), "{err}");
    before.check(&env, "snapshot archive");
}

#[test]
fn inflation_beyond_what_is_written_is_refused() {
    crate::require_root!();
    let mut env = TestEnv::new();
    let work = env.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let before = Unchanged::now(&env);
    // A valid layer followed by 64 MiB of zeros (compressed: a few KiB), which its diff id
    // and blob digest cover: nothing is wrong with it but the size of what follows its end.
    let bb = busybox_layer(b"x\n");
    let padded = with_zeros(&greeting_layer(b"hi\n"), 64 << 20);
    let cfg = config(&diff_ids(&[&bb, &padded]));
    let mut cases: Vec<(&str, PathBuf)> = Vec::new();
    let p = work.join("docker.tar.zst");
    let archive = docker_save(&cfg, &["a/layer.tar", "b/layer.tar"], |b| {
        file(b, "a/layer.tar", &bb);
        file(b, "b/layer.tar", &padded);
    });
    std::fs::write(&p, zstd::encode_all(&archive[..], 19).unwrap()).unwrap();
    cases.push(("docker archive", p));
    let p = work.join("layout");
    write_dir(&p, &oci_members(&cfg, &[&bb, &padded]).0);
    cases.push(("OCI layout", p));
    let p = work.join("rootfs.tar.zst");
    std::fs::write(&p, zstd::encode_all(&padded[..], 19).unwrap()).unwrap();
    cases.push(("rootfs tarball", p));
    for (what, path) in &cases {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let err = import_fails(&env, path);
        assert!(
            err.contains("follows the end of the tar archive"),
            "{what} ({size} bytes): {err}"
        );
        before.check(&env, what);
    }
    // A snapshot's layer.tar, the same way; one larger than its manifest says; a
    // manifest.json that declares more than a manifest may be.
    let snap = |name: &str, bytes: Vec<u8>| {
        let a = work.join(name);
        std::fs::write(&a, bytes).unwrap();
        env.fails(&["snapshot", "import", a.to_str().unwrap(), "--name", "bomb"])
    };
    let err = snap(
        "padded.tar.zst",
        snapshot_archive(&padded, serde_json::json!({})),
    );
    assert!(err.contains("follows the end of the tar archive"), "{err}");
    before.check(&env, "snapshot with data after its layer");
    let layer = greeting_layer(b"hi\n");
    let manifest = serde_json::json!({
        "format": "dev-box.snapshot/v1",
        "snapshot": {"name": "s", "created_at": "2026-01-01T00:00:00Z", "message": null, "labels": {}},
        "sandbox": {"name": "probe", "manifest": {"apiVersion": "sandbox.io/v1", "kind": "Sandbox", "spec": {}}},
        "image": {"id": "host", "name": "host"},
        "layer": {"digest": format!("sha256:{}", sha(&layer)), "size": layer.len()},
    });
    let json = serde_json::to_vec(&manifest).unwrap();
    let outer = tar_with(|b| {
        file(b, "manifest.json", &json);
        file(b, "layer.tar", &padded);
    });
    let err = snap("longer.tar.zst", zstd::encode_all(&outer[..], 19).unwrap());
    assert!(err.contains("the manifest says"), "{err}");
    before.check(
        &env,
        "snapshot whose layer.tar is longer than its manifest says",
    );
    let mut big = json.clone();
    big.extend(std::iter::repeat_n(b' ', 2 << 20));
    let outer = tar_with(|b| file(b, "manifest.json", &big));
    let err = snap(
        "manifest.tar.zst",
        zstd::encode_all(&outer[..], 19).unwrap(),
    );
    assert!(err.contains("more than a manifest may be"), "{err}");
    before.check(&env, "snapshot with a huge manifest");
    // What tar writers emit after the end marker is fine: GNU tar pads to 10240 bytes.
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/greeting"), b"gnu\n").unwrap();
    let gnu = work.join("gnu.tar");
    let st = std::process::Command::new("tar")
        .args(["--format=gnu", "-cf"])
        .arg(&gnu)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::metadata(&gnu).unwrap().len() % 10240, 0);
    env.ok(&["image", "import", gnu.to_str().unwrap()]);
    // Data an entry declares that the import skips counts against the cap: a directory
    // entry with 64 MiB of zeros, under a 16 MiB cap.
    env.restart_with_env("DEVBOX_IMPORT_MAX_BYTES", "16M");
    let before = Unchanged::now(&env);
    let dir_bomb = tar_with(|b| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_path("d").unwrap();
        h.set_mode(0o755);
        h.set_size(64 << 20);
        h.set_cksum();
        b.append(&h, &vec![0u8; 64 << 20][..]).unwrap();
    });
    let p = work.join("dir-bomb.tar.gz");
    std::fs::write(&p, gzip(&dir_bomb)).unwrap();
    let err = import_fails(&env, &p);
    assert!(err.contains("DEVBOX_IMPORT_MAX_BYTES"), "{err}");
    before.check(&env, "skipped data over the cap");
    let a = work.join("dir-bomb-snap.tar.zst");
    std::fs::write(&a, snapshot_archive(&dir_bomb, serde_json::json!({}))).unwrap();
    let err = env.fails(&["snapshot", "import", a.to_str().unwrap(), "--name", "db"]);
    assert!(err.contains("DEVBOX_IMPORT_MAX_BYTES"), "{err}");
    before.check(&env, "skipped data of a snapshot over the cap");
}

#[test]
fn descriptor_sizes_and_docker_config_names_are_checked() {
    crate::require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let bb = busybox_layer(b"sized\n");
    let cfg = config(&diff_ids(&[&bb]));
    let before = Unchanged::now(&env);
    // An OCI layer blob whose descriptor gives another size.
    let (mut members, _) = oci_members(&cfg, &[&bb]);
    let gz = gzip(&bb);
    let blob = format!("blobs/sha256/{}", sha(&gz));
    let manifest_at = members
        .iter()
        .position(|(n, d)| {
            n.starts_with("blobs/")
                && serde_json::from_slice::<serde_json::Value>(d)
                    .map(|v| v.get("layers").is_some())
                    .unwrap_or(false)
        })
        .unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&members[manifest_at].1).unwrap();
    m["layers"][0]["size"] = (gz.len() + 4096).into();
    let doctored = serde_json::to_vec(&m).unwrap();
    let old = members[manifest_at].0.clone();
    members[manifest_at] = (format!("blobs/sha256/{}", sha(&doctored)), doctored.clone());
    for (n, d) in members.iter_mut() {
        if n == "index.json" {
            let mut idx: serde_json::Value = serde_json::from_slice(d).unwrap();
            idx["manifests"][0]["digest"] = format!("sha256:{}", sha(&doctored)).into();
            idx["manifests"][0]["size"] = doctored.len().into();
            *d = serde_json::to_vec(&idx).unwrap();
        }
    }
    assert!(members.iter().any(|(n, _)| *n == blob) && old != members[manifest_at].0);
    let p = work.join("layout");
    write_dir(&p, &members);
    let err = import_fails(&env, &p);
    assert!(err.contains("descriptor says"), "{err}");
    before.check(&env, "OCI descriptor size");
    // A docker config named by a digest that is not its own.
    let other = "ab".repeat(32);
    let manifest = serde_json::to_vec(
        &serde_json::json!([{"Config": format!("{other}.json"), "Layers": ["a/layer.tar"]}]),
    )
    .unwrap();
    let p = work.join("misnamed.tar");
    std::fs::write(
        &p,
        tar_with(|b| {
            file(b, "manifest.json", &manifest);
            file(b, &format!("{other}.json"), &cfg);
            file(b, "a/layer.tar", &bb);
        }),
    )
    .unwrap();
    let err = import_fails(&env, &p);
    assert!(err.contains("does not match its digest"), "{err}");
    before.check(&env, "misnamed docker config");
    // A docker config under another name: stored under the digest of its bytes.
    let manifest = serde_json::to_vec(&serde_json::json!([{"Config": "config.json", "RepoTags": ["named:1"], "Layers": ["a/layer.tar"]}])).unwrap();
    let p = work.join("plain-name.tar");
    std::fs::write(
        &p,
        tar_with(|b| {
            file(b, "manifest.json", &manifest);
            file(b, "config.json", &cfg);
            file(b, "a/layer.tar", &bb);
        }),
    )
    .unwrap();
    env.ok(&["image", "import", p.to_str().unwrap()]);
    assert!(env.pool_dir().join("images").join(sha(&cfg)).is_dir());
}

#[test]
fn links_in_an_archive_are_never_written_through() {
    crate::require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let before = Unchanged::now(&env);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a file below an in-tree symlink",
            tar_with(|b| {
                file(b, "usr/bin/tool", b"x");
                symlink(b, "bin", "usr/bin");
                file(b, "bin/via-link", b"x");
            }),
        ),
        (
            "a chain of links, each twice the last",
            tar_with(|b| {
                symlink(b, "l0", ".");
                for i in 1..3000 {
                    symlink(b, &format!("l{i}"), &format!("l{0}/l{0}", i - 1));
                }
                file(b, "l2999/x", b"x");
            }),
        ),
        (
            "a directory below a link to the root",
            tar_with(|b| {
                symlink(b, "up", "/");
                raw(b, tar::EntryType::Directory, "up/etc/deep", "", b"");
            }),
        ),
    ];
    for (what, data) in &cases {
        let p = work.join("links.tar.gz");
        std::fs::write(&p, gzip(data)).unwrap();
        let err = import_fails(&env, &p);
        assert!(
            err.contains("refusing archive entry") && err.contains("symlink"),
            "{what}: {err}"
        );
        before.check(&env, what);
        let a = work.join("links-snap.tar.zst");
        std::fs::write(&a, snapshot_archive(data, serde_json::json!({}))).unwrap();
        let err = env.fails(&["snapshot", "import", a.to_str().unwrap(), "--name", "ln"]);
        assert!(err.contains("symlink"), "{what}, snapshot: {err}");
        before.check(&env, what);
    }
    // A later layer replaces a symlink by a directory: that is a layer's right.
    let lower = tar_with(|b| {
        raw(b, tar::EntryType::Directory, "usr/lib/", "", b"");
        file(b, "usr/lib/a", b"a");
        symlink(b, "lib", "usr/lib");
    });
    let upper = tar_with(|b| {
        raw(b, tar::EntryType::Directory, "lib/", "", b"");
        file(b, "lib/b", b"b");
    });
    let cfg = config(&diff_ids(&[&lower, &upper]));
    let p = work.join("replace");
    write_dir(&p, &oci_members(&cfg, &[&lower, &upper]).0);
    env.ok(&["image", "import", p.to_str().unwrap()]);
    let stored = env.pool_dir().join("images").join(sha(&cfg));
    assert!(stored.join("lib").symlink_metadata().unwrap().is_dir());
    assert_eq!(std::fs::read(stored.join("lib/b")).unwrap(), b"b");
    assert!(!stored.join("usr/lib/b").exists());
}
