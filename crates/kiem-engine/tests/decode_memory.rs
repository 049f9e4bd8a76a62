//! Decoding a quantized GGUF holds about the file's bytes: its matrices are never expanded to
//! fp32. A test binary of its own, since it reads this process's resident memory.

use kiem_engine::config::{Arch, Block, Rope, RopeScaling};
use kiem_engine::gguf::{load_gguf_for_decoding, write_gguf, ExportType, GgufFile};
use kiem_engine::infer::KvCache;
use kiem_engine::{Gpt, ModelConfig};

/// Anonymous resident memory of this process (the file's mapped pages excluded), in bytes.
#[cfg(target_os = "linux")]
fn resident_anonymous() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[cfg(target_os = "linux")]
#[test]
fn a_quantized_file_decodes_in_about_its_own_size() {
    // A Llama of about 40M parameters (fp32: 160 MB), untied head.
    let rope = Rope {
        theta: 10_000.0,
        scaling: RopeScaling::Default,
    };
    let config = ModelConfig {
        arch: Arch::Llama,
        block: Block::llama(1e-5, rope),
        n_kv_head: Some(4),
        mlp_hidden: Some(1536),
        ..ModelConfig::gpt2(8, 8, 512, 256, 8192)
    };
    let tmp = tempfile::tempdir().unwrap();
    for (export, most) in [(ExportType::Q4_0, 1.2), (ExportType::Q8_0, 1.12)] {
        let path = tmp.path().join("model.gguf");
        {
            let mut gpt = Gpt::new(config).unwrap();
            gpt.init_random(1);
            write_gguf(&gpt, &[], export, "t", &path).unwrap();
        }
        let file_bytes = std::fs::metadata(&path).unwrap().len();
        // Memory freed so far goes back to the system, so the new model's is counted.
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe { libc::malloc_trim(0) };
        let before = resident_anonymous();
        let gpt = {
            let file = GgufFile::open(&path).unwrap();
            load_gguf_for_decoding(&file).unwrap().0
        };
        let mut cache = [KvCache::new(&gpt)];
        let prompt: Vec<u32> = (0..40).map(|i| i * 97 % 8192).collect();
        gpt.forward_cached(&mut cache, &[&prompt]).unwrap();
        for t in 0..4 {
            gpt.forward_cached(&mut cache, &[&[t]]).unwrap();
        }
        // What is live, not what the allocator keeps for reuse.
        // SAFETY: as above.
        unsafe { libc::malloc_trim(0) };
        let held = resident_anonymous().saturating_sub(before);
        let cache_bytes = cache[0].allocated_bytes() as u64;
        let ratio = held.saturating_sub(cache_bytes) as f64 / file_bytes as f64;
        // Blocks keep their scale as f32: Q4_0 20 bytes a block instead of the file's 18,
        // Q8_0 36 instead of 34.
        let report = format!(
            "{export:?}: decoding holds {held} bytes ({cache_bytes} of them KV cache) for a \
             {file_bytes}-byte file: {ratio:.2}x the file besides the cache"
        );
        assert!(ratio < most, "{report}");
        eprintln!("{report}");
        drop(gpt);
    }
}
