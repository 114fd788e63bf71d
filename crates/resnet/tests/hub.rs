//! Hub loading against a mock hub on 127.0.0.1, never the internet.
//!
//! The mock answers like huggingface.co does for an LFS file: the `resolve`
//! URL redirects to a CDN URL and carries `x-repo-commit` and
//! `x-linked-etag`; the CDN URL serves byte ranges. This is the one test of
//! this binary because it sets `HF_ENDPOINT` and `HF_HOME` for the process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multilabel_resnet::{
    Arch, HeadConfig, ResNet, ResNetConfig, ResNetError, WeightsSource, load_pretrained,
};

const REPO: &str = "timm/resnet18.mock_in1k";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const ETAG: &str = "5f2d3c1e0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d";

struct MockHub {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    served_bytes: Arc<AtomicUsize>,
}

fn start_mock_hub(file: Vec<u8>) -> MockHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let served_bytes = Arc::new(AtomicUsize::new(0));
    let (log, served, base) = (requests.clone(), served_bytes.clone(), url.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            serve(stream, &file, &base, &log, &served);
        }
    });
    MockHub {
        url,
        requests,
        served_bytes,
    }
}

fn serve(
    mut stream: TcpStream,
    file: &[u8],
    base: &str,
    log: &Mutex<Vec<String>>,
    served: &AtomicUsize,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    log.lock().unwrap().push(path.clone());
    let resolve = format!("/{REPO}/resolve/main/model.safetensors");
    let response = if path == resolve {
        format!(
            "HTTP/1.1 302 Found\r\nLocation: {base}/cdn/blob\r\nx-repo-commit: {COMMIT}\r\n\
             x-linked-etag: \"{ETAG}\"\r\nx-linked-size: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            file.len()
        )
        .into_bytes()
    } else if path == "/cdn/blob" {
        let range = headers.get("range").cloned().unwrap_or_default();
        let (start, end) = parse_range(&range, file.len());
        let body = &file[start..=end];
        served.fetch_add(body.len(), Ordering::SeqCst);
        let mut head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{}\r\n\
             Content-Length: {}\r\nETag: \"{ETAG}\"\r\nConnection: close\r\n\r\n",
            file.len(),
            body.len()
        )
        .into_bytes();
        head.extend_from_slice(body);
        head
    } else {
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
    };
    let _ = stream.write_all(&response);
}

/// `bytes=a-b` or `bytes=a-` → inclusive range.
fn parse_range(range: &str, len: usize) -> (usize, usize) {
    let spec = range.strip_prefix("bytes=").unwrap_or("0-");
    let (a, b) = spec.split_once('-').unwrap_or(("0", ""));
    let start = a.parse().unwrap_or(0);
    let end = b.parse().unwrap_or(len - 1).min(len - 1);
    (start, end)
}

fn build(seed: u64) -> VarMap {
    let cfg = ResNetConfig {
        arch: Arch::ResNet18,
        base_width: 4,
        head: HeadConfig::new(2),
        kernels: Default::default(),
        tf32: false,
        precision: Default::default(),
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    ResNet::new(&cfg, vb, seed).unwrap();
    varmap
}

fn body_values(varmap: &VarMap) -> HashMap<String, Vec<f32>> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| !n.starts_with("head."))
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn downloads_through_hf_endpoint_and_reuses_the_cache_offline() {
    let source = build(1);
    let mut tensors: HashMap<String, Tensor> = source
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| !n.starts_with("head."))
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    tensors.insert(
        "fc.weight".into(),
        Tensor::zeros((1000, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "fc.bias".into(),
        Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let file_path = dir.path().join("served.safetensors");
    candle_core::safetensors::save(&tensors, &file_path).unwrap();
    let file = std::fs::read(&file_path).unwrap();
    let hub = start_mock_hub(file.clone());
    let hf_home = dir.path().join("hf-home");
    // Safety: this test binary runs this single test, so no other thread
    // reads the environment concurrently.
    unsafe {
        std::env::set_var("HF_ENDPOINT", &hub.url);
        std::env::set_var("HF_HOME", &hf_home);
    }

    // Offline before anything is cached: a clear error naming the cache.
    let offline = WeightsSource::Hub {
        repo: REPO.into(),
        offline: true,
    };
    let target = build(2);
    match load_pretrained(&target, &offline) {
        Err(err @ ResNetError::NotCached { .. }) => {
            let message = err.to_string();
            assert!(
                message.contains(REPO) && message.contains("hf-home"),
                "{message}"
            );
        }
        other => panic!("expected NotCached, got {other:?}"),
    }
    assert!(hub.requests.lock().unwrap().is_empty());

    // Online: fetched from the mock hub into $HF_HOME/hub.
    let online = WeightsSource::Hub {
        repo: REPO.into(),
        offline: false,
    };
    let report = load_pretrained(&target, &online).unwrap();
    assert_eq!(body_values(&target), body_values(&source));
    assert!(report.skipped.contains(&"fc.bias".to_string()));
    let cached = report.path.unwrap();
    assert!(cached.starts_with(hf_home.join("hub").join("models--timm--resnet18.mock_in1k")));
    assert_eq!(std::fs::read(&cached).unwrap(), file);
    let requests = hub.requests.lock().unwrap().clone();
    assert!(
        requests.contains(&format!("/{REPO}/resolve/main/model.safetensors")),
        "{requests:?}"
    );
    assert!(hub.served_bytes.load(Ordering::SeqCst) >= file.len());

    // Offline again: served from the cache without a request.
    let n_requests = requests.len();
    let third = build(3);
    load_pretrained(&third, &offline).unwrap();
    assert_eq!(body_values(&third), body_values(&source));
    assert_eq!(hub.requests.lock().unwrap().len(), n_requests);

    // An unknown repo is a hub error naming it.
    let missing = WeightsSource::Hub {
        repo: "timm/no-such-repo".into(),
        offline: false,
    };
    let message = load_pretrained(&third, &missing).unwrap_err().to_string();
    assert!(message.contains("timm/no-such-repo"), "{message}");
}
