//! Downloads against an HTTP server on 127.0.0.1 serving archives made here:
//! good, truncated, cut off mid-body, wrong checksum, escaping entries.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use md5::{Digest, Md5};
use multilabel_data::{
    DataError, DownloadEvent, VERIFIED_MARKER, default_cache_dir, download_archive,
};

/// What the server answers for a path.
#[derive(Clone)]
enum Reply {
    Body(Vec<u8>),
    /// Announces the full length, sends `sent` bytes, then hangs up.
    CutOff {
        body: Vec<u8>,
        sent: usize,
    },
}

struct Server {
    base: String,
    requests: Arc<AtomicUsize>,
}

fn serve(routes: HashMap<&'static str, Reply>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let request = String::from_utf8_lossy(&request);
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, length, body) = match routes.get(path.as_str()) {
                Some(Reply::Body(body)) => ("200 OK", body.len(), body.clone()),
                Some(Reply::CutOff { body, sent }) => {
                    ("200 OK", body.len(), body[..*sent].to_vec())
                }
                None => ("404 Not Found", 0, Vec::new()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    Server { base, requests }
}

fn md5_hex(bytes: &[u8]) -> String {
    format!("{:x}", Md5::digest(bytes))
}

/// A gzipped tar of `(path, contents)` files, written without the tar
/// crate's path checks so hostile names can be made too.
fn tgz(files: &[(&str, &[u8])], symlinks: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    for (path, target) in symlinks {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        header.set_size(0);
        header.set_mode(0o777);
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_cksum();
        builder.append(&header, std::io::empty()).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn good_archive() -> Vec<u8> {
    tgz(
        &[
            (
                "pascal/train.csv",
                b"fname,labels,is_valid\nx.jpg,cat,False\n",
            ),
            ("pascal/train/x.jpg", b"not really a jpeg"),
        ],
        &[],
    )
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn good_archive_is_verified_extracted_and_then_left_alone() {
    let archive = good_archive();
    let server = serve(HashMap::from([("/p.tgz", Reply::Body(archive.clone()))]));
    let cache = tempfile::tempdir().unwrap();
    let dest = cache.path().join("pascal_2007");
    let url = format!("{}/p.tgz", server.base);
    let md5 = md5_hex(&archive);

    let mut events = Vec::new();
    let path = download_archive(&url, archive.len() as u64, &md5, &dest, &mut |e| {
        events.push(e)
    })
    .unwrap();
    assert_eq!(path, dest);
    // The single top-level folder of the archive became `dest`.
    assert_eq!(
        std::fs::read_to_string(dest.join("train.csv")).unwrap(),
        "fname,labels,is_valid\nx.jpg,cat,False\n"
    );
    assert!(dest.join("train/x.jpg").is_file());
    assert_eq!(
        std::fs::read_to_string(dest.join(VERIFIED_MARKER))
            .unwrap()
            .trim(),
        md5
    );
    // No temporary files are left beside it.
    assert_eq!(listing(cache.path()), ["pascal_2007"]);

    assert!(
        matches!(&events[0], DownloadEvent::Started { total, .. } if *total == archive.len() as u64)
    );
    assert!(events.iter().any(|e| matches!(e,
        DownloadEvent::Downloaded { done, total } if done == total)));
    assert!(events.contains(&DownloadEvent::Verified { md5: md5.clone() }));
    assert!(events.contains(&DownloadEvent::Extracting { entries: 2 }));
    assert_eq!(
        events.last(),
        Some(&DownloadEvent::Finished { path: dest.clone() })
    );

    // A second call finds the verified copy and does not download.
    let mut again = Vec::new();
    download_archive(&url, archive.len() as u64, &md5, &dest, &mut |e| {
        again.push(e)
    })
    .unwrap();
    assert_eq!(
        again,
        [DownloadEvent::AlreadyPresent { path: dest.clone() }]
    );
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn archive_without_a_single_top_folder_is_extracted_as_is() {
    let archive = tgz(&[("a.txt", b"a"), ("b/c.txt", b"c")], &[]);
    let server = serve(HashMap::from([("/flat.tgz", Reply::Body(archive.clone()))]));
    let cache = tempfile::tempdir().unwrap();
    let dest = cache.path().join("flat");
    download_archive(
        &format!("{}/flat.tgz", server.base),
        archive.len() as u64,
        &md5_hex(&archive),
        &dest,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(listing(&dest), [VERIFIED_MARKER, "a.txt", "b"]);
}

fn expect_failure(reply: Reply, size: u64, md5: &str) -> (DataError, tempfile::TempDir) {
    let server = serve(HashMap::from([("/x.tgz", reply)]));
    let cache = tempfile::tempdir().unwrap();
    let dest = cache.path().join("x");
    let err = download_archive(
        &format!("{}/x.tgz", server.base),
        size,
        md5,
        &dest,
        &mut |_| {},
    )
    .unwrap_err();
    // Nothing is left behind: no destination, no partial download.
    assert_eq!(listing(cache.path()), Vec::<String>::new(), "{err}");
    (err, cache)
}

#[test]
fn truncated_download_is_a_size_error() {
    let archive = good_archive();
    let half = archive[..archive.len() / 2].to_vec();
    let (err, _) = expect_failure(
        Reply::Body(half.clone()),
        archive.len() as u64,
        &md5_hex(&archive),
    );
    match err {
        DataError::SizeMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, archive.len() as u64);
            assert_eq!(actual, half.len() as u64);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn connection_cut_mid_body_is_an_error() {
    let archive = good_archive();
    let reply = Reply::CutOff {
        body: archive.clone(),
        sent: archive.len() / 3,
    };
    let (err, _) = expect_failure(reply, archive.len() as u64, &md5_hex(&archive));
    assert!(
        matches!(
            err,
            DataError::Download { .. } | DataError::SizeMismatch { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn wrong_checksum_is_refused() {
    let archive = good_archive();
    let wrong = "0123456789abcdef0123456789abcdef";
    let (err, _) = expect_failure(Reply::Body(archive.clone()), archive.len() as u64, wrong);
    match err {
        DataError::ChecksumMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, md5_hex(&archive));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn entries_escaping_the_destination_are_refused() {
    let cases: [Vec<u8>; 3] = [
        tgz(&[("ok/a.txt", b"a"), ("../evil.txt", b"evil")], &[]),
        tgz(&[("ok/a.txt", b"a"), ("ok/../../evil.txt", b"evil")], &[]),
        tgz(&[("ok/a.txt", b"a")], &[("ok/link", "../../..")]),
    ];
    for archive in cases {
        let (err, cache) = expect_failure(
            Reply::Body(archive.clone()),
            archive.len() as u64,
            &md5_hex(&archive),
        );
        assert!(
            matches!(err, DataError::UnsafeArchiveEntry { .. }),
            "{err:?}"
        );
        assert!(!cache.path().parent().unwrap().join("evil.txt").exists());
    }
}

#[test]
fn unverified_destination_is_not_overwritten_and_404_is_an_error() {
    let server = serve(HashMap::new());
    let cache = tempfile::tempdir().unwrap();
    let dest = cache.path().join("mine");
    std::fs::create_dir(&dest).unwrap();
    let url = format!("{}/missing.tgz", server.base);
    let err = download_archive(&url, 10, "00", &dest, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, DataError::DestinationExists { .. }),
        "{err:?}"
    );
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);

    let err =
        download_archive(&url, 10, "00", &cache.path().join("other"), &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, DataError::Download { url: u, .. } if *u == url),
        "{err:?}"
    );
}

#[test]
fn cache_dir_comes_from_the_environment() {
    // SAFETY: no other test in this binary reads or writes this variable.
    unsafe { std::env::set_var("MULTILABEL_DATA", "/tmp/somewhere") };
    assert_eq!(default_cache_dir(), Path::new("/tmp/somewhere"));
    unsafe { std::env::remove_var("MULTILABEL_DATA") };
    assert_eq!(default_cache_dir(), Path::new("data"));
}
