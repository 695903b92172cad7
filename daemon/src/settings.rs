//! Layered daemon configuration, shared by the relay and the master target.
//!
//! Values are merged from four layers, each overriding the one before:
//!
//! 1. built-in defaults (the daemon's settings struct's `Default`);
//! 2. a TOML file: the one named by `--config` (which must exist), else the daemon's
//!    default path (e.g. `/etc/relay/relay.toml`) if it exists;
//! 3. environment variables with the daemon's prefix: `RELAY_CACHE__CAPACITY=200GiB`
//!    sets `cache.capacity` (`__` separates levels, one `_` follows the prefix);
//! 4. command-line flags.
//!
//! Every key is checked against the keys the defaults have (plus free-form tables such
//! as `egress.vm_weights`), so a misspelt key is an error naming it and where it came
//! from rather than a silently ignored setting. Wrong types are errors naming the key;
//! range checks are the daemon's (`validate`), also naming the key. Daemons exit with
//! code 64 (EX_USAGE) on any of these.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use config::Source;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A configuration problem: the key at fault (dotted) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config key `{}`: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Where a daemon's settings come from.
#[derive(Debug, Clone)]
pub struct Layers<'a> {
    /// The file named on the command line (`--config`): must exist.
    pub explicit_file: Option<&'a Path>,
    /// The default file, used when it exists and no explicit file is named.
    pub default_file: &'a Path,
    /// Environment prefix without the trailing underscore, e.g. `RELAY`.
    pub env_prefix: &'a str,
    /// Dotted key prefixes whose sub-keys are free-form (e.g. `egress.vm_weights`).
    pub free_form: &'a [&'a str],
    /// Flag values, as (dotted key, value); the last layer.
    pub overrides: Vec<(String, config::Value)>,
}

/// Merges `defaults` with the layers and deserializes the result.
pub fn load<T: Serialize + DeserializeOwned>(
    defaults: &T,
    layers: Layers<'_>,
) -> Result<T, ConfigError> {
    let known = known_keys(defaults)?;
    let defaults_source = config::Config::try_from(defaults)
        .map_err(|e| ConfigError::new("(defaults)", e.to_string()))?;
    let mut builder = config::Config::builder().add_source(defaults_source);
    let file = match layers.explicit_file {
        Some(path) => {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            Some(path.to_path_buf())
        }
        None => layers
            .default_file
            .is_file()
            .then(|| layers.default_file.to_path_buf()),
    };
    if let Some(path) = &file {
        builder = builder.add_source(
            config::File::from(path.as_path())
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    builder = builder.add_source(
        config::Environment::with_prefix(layers.env_prefix)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true),
    );
    for (key, value) in layers.overrides {
        builder = builder
            .set_override(key.as_str(), value)
            .map_err(|e| ConfigError::new(key.clone(), e.to_string()))?;
    }
    let merged = builder.build().map_err(|e| from_config_error(e, &file))?;
    check_keys(&merged, &known, layers.free_form, layers.env_prefix)?;
    let leaves = leaves(&merged);
    merged.try_deserialize::<T>().map_err(|e| {
        let mut err = from_config_error(e, &file);
        if err.key == "(value)" {
            // A value's own parser (a size, an address) failed, and serde does not say
            // which key it was reading: find the one value that alone fails the same way.
            err.key = leaves
                .into_iter()
                .find(|(key, value)| {
                    let alone = config::Config::try_from(defaults).and_then(|d| {
                        config::Config::builder()
                            .add_source(d)
                            .set_override(key.as_str(), value.clone())?
                            .build()
                    });
                    alone
                        .and_then(|c| c.try_deserialize::<T>())
                        .is_err_and(|e| from_config_error(e, &None).reason == err.reason)
                })
                .map(|(key, _)| key)
                .unwrap_or(err.key);
        }
        err
    })
}

/// Every leaf of the merged config as (dotted key, value).
fn leaves(merged: &config::Config) -> Vec<(String, config::Value)> {
    let mut out = Vec::new();
    let Ok(table) = merged.collect() else {
        return out;
    };
    let mut stack: Vec<(String, config::Value)> = table.into_iter().collect();
    while let Some((key, value)) = stack.pop() {
        match value.kind {
            config::ValueKind::Table(t) => {
                stack.extend(t.into_iter().map(|(k, v)| (format!("{key}.{k}"), v)))
            }
            _ => out.push((key, value)),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every dotted key the defaults define (null values included).
fn known_keys<T: Serialize>(defaults: &T) -> Result<BTreeSet<String>, ConfigError> {
    let value = serde_json::to_value(defaults)
        .map_err(|e| ConfigError::new("(defaults)", e.to_string()))?;
    let mut keys = BTreeSet::new();
    fn walk(prefix: &str, v: &serde_json::Value, keys: &mut BTreeSet<String>) {
        if let serde_json::Value::Object(map) = v {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                keys.insert(key.clone());
                walk(&key, v, keys);
            }
        }
    }
    walk("", &value, &mut keys);
    Ok(keys)
}

fn check_keys(
    merged: &config::Config,
    known: &BTreeSet<String>,
    free_form: &[&str],
    env_prefix: &str,
) -> Result<(), ConfigError> {
    let table = merged
        .collect()
        .map_err(|e| ConfigError::new("(config)", e.to_string()))?;
    let mut stack: Vec<(String, config::Value)> = table.into_iter().collect();
    while let Some((key, value)) = stack.pop() {
        if free_form.iter().any(|p| key.starts_with(&format!("{p}."))) {
            continue;
        }
        if !known.contains(&key) {
            // A table (`[a.b]` in a file) carries no origin: say nothing rather than guess.
            let origin = match value.origin() {
                Some(o) if o.contains("environment") => format!(
                    " (set by the environment variable {env_prefix}_{})",
                    key.to_ascii_uppercase().replace('.', "__")
                ),
                Some(o) => format!(" (set in {o})"),
                None => String::new(),
            };
            return Err(ConfigError::new(
                key,
                format!("unknown key{origin}; see docs/CONFIGURATION.md for the keys"),
            ));
        }
        if let config::ValueKind::Table(t) = value.kind {
            stack.extend(t.into_iter().map(|(k, v)| (format!("{key}.{k}"), v)));
        }
    }
    Ok(())
}

fn from_config_error(e: config::ConfigError, file: &Option<PathBuf>) -> ConfigError {
    match e {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => ConfigError::new(
            key.unwrap_or_else(|| "(unknown)".into()),
            format!(
                "expected {expected}, found {unexpected}{}",
                origin.map(|o| format!(" (in {o})")).unwrap_or_default()
            ),
        ),
        config::ConfigError::NotFound(key) => ConfigError::new(key, "missing"),
        config::ConfigError::FileParse { uri, cause } => ConfigError::new(
            "(file)",
            format!("{} is not valid TOML: {cause}", uri.unwrap_or_default()),
        ),
        config::ConfigError::Foreign(cause) => ConfigError::new(
            "(file)",
            format!(
                "{}: {cause}",
                file.as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default()
            ),
        ),
        other => {
            // serde's messages (custom values, missing fields) name the field but not
            // always its table; they still read well.
            let text = other.to_string();
            let key = text
                .split('`')
                .nth(1)
                .filter(|_| text.contains('`'))
                .unwrap_or("(value)")
                .to_string();
            ConfigError::new(key, text)
        }
    }
}

/// Parses an optional listen address (`""` disables the listener); errors name `key`.
pub fn listen_addr(key: &str, value: &str) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let s = value.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        ConfigError::new(
            key,
            format!("{s:?} is not an address like 0.0.0.0:9464 (or \"\" to disable)"),
        )
    })
}

/// What a daemon's settings struct tells the loader: where its file lives, its
/// environment prefix, and its own range checks.
pub trait DaemonSettings: Serialize + DeserializeOwned + Default {
    /// The config file read when `--config` is not given (if it exists).
    const DEFAULT_CONFIG_FILE: &'static str;
    /// Environment prefix without the trailing underscore, e.g. `RELAY`.
    const ENV_PREFIX: &'static str;
    /// Dotted key prefixes whose sub-keys are free-form (e.g. `egress.vm_weights`).
    const FREE_FORM_TABLES: &'static [&'static str] = &[];
    /// Checks every value; the first problem names its key.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// The effective, validated settings of a daemon: defaults, then the file named by
/// `--config` (or the default file), then the environment, then `flags`.
pub fn load_settings<S: DaemonSettings>(
    explicit_file: Option<&Path>,
    flags: Vec<(String, config::Value)>,
) -> Result<S, ConfigError> {
    let settings = load(
        &S::default(),
        Layers {
            explicit_file,
            default_file: Path::new(S::DEFAULT_CONFIG_FILE),
            env_prefix: S::ENV_PREFIX,
            free_form: S::FREE_FORM_TABLES,
            overrides: flags,
        },
    )?;
    settings.validate()?;
    Ok(settings)
}

/// The flags given on a command line, as (dotted config key, value): the last layer.
///
/// A daemon declares each flag once, on a `clap::Args` struct that also derives
/// `Serialize`: the field's serde name is the config key it overrides
/// (`#[serde(rename = "cache.capacity")]`), flags not given are `None` and skipped, and
/// fields that are not config keys are `#[serde(skip)]`. So the flag, its help and its
/// key live on one line of code.
pub fn flag_overrides<T: Serialize>(
    flags: &T,
) -> Result<Vec<(String, config::Value)>, ConfigError> {
    let value =
        serde_json::to_value(flags).map_err(|e| ConfigError::new("(flags)", e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(ConfigError::new("(flags)", "flags are not a struct"));
    };
    let mut out = Vec::new();
    for (key, v) in map {
        let v: config::Value = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::Bool(b) => b.into(),
            serde_json::Value::String(s) => s.into(),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => i.into(),
                None => n.as_f64().unwrap_or(f64::NAN).into(),
            },
            other => {
                return Err(ConfigError::new(
                    key,
                    format!("a flag must be a single value, not {other}"),
                ))
            }
        };
        out.push((key, v));
    }
    Ok(out)
}

/// For a flag given in MiB whose key is a [`ByteSize`]:
/// `#[serde(rename = "cache.segment_size", serialize_with = "fbr_daemon::settings::mib_flag")]`.
pub fn mib_flag<S: Serializer>(mib: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match mib {
        Some(n) => s.serialize_str(&format!("{n}MiB")),
        None => s.serialize_none(),
    }
}

/// Exit code for bad configuration or usage (EX_USAGE from sysexits.h).
pub const EX_USAGE: u8 = 64;

/// A size in bytes, written as an integer or with a unit: `8GiB`, `64MiB`, `4096`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
    pub const fn gib(n: u64) -> Self {
        ByteSize(n << 30)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n >= 1 << shift && n % (1 << shift) == 0 {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 8GiB, 64MiB or 4096")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                crate::process::parse_size(v)
                    .map(ByteSize)
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Inner {
        capacity: ByteSize,
        segments: u32,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Settings {
        name: String,
        address: Option<String>,
        inner: Inner,
        #[serde(default)]
        weights: BTreeMap<String, u32>,
    }

    fn defaults() -> Settings {
        Settings {
            name: "relay".into(),
            address: None,
            inner: Inner {
                capacity: ByteSize::gib(8),
                segments: 4,
            },
            weights: BTreeMap::new(),
        }
    }

    fn load_with(
        file: &str,
        overrides: Vec<(String, config::Value)>,
    ) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        load(
            &defaults(),
            Layers {
                explicit_file: Some(&path),
                default_file: Path::new("/nonexistent"),
                env_prefix: "FBR_SETTINGS_TEST_NOTHING_SET",
                free_form: &["weights"],
                overrides,
            },
        )
    }

    #[test]
    fn layers_override_in_order() {
        let s = load_with(
            "name = \"from-file\"\naddress = \"10.0.0.1:1\"\n[inner]\ncapacity = \"64MiB\"\n[weights]\nvm-a = 3\n",
            vec![("inner.segments".into(), 9i64.into())],
        )
        .unwrap();
        assert_eq!(s.name, "from-file");
        assert_eq!(s.address.as_deref(), Some("10.0.0.1:1"));
        assert_eq!(s.inner.capacity, ByteSize::mib(64));
        assert_eq!(s.inner.segments, 9, "flags override the file");
        assert_eq!(s.weights["vm-a"], 3);
        assert_eq!(load_with("", vec![]).unwrap(), defaults());
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_with("[inner]\ncapcity = 1\n", vec![]).unwrap_err();
        assert_eq!(e.key, "inner.capcity", "{e}");
        assert!(
            e.reason.contains("unknown key") && e.reason.contains("c.toml"),
            "{e}"
        );
        let e = load_with("[inner]\nsegments = \"many\"\n", vec![]).unwrap_err();
        assert_eq!(e.key, "inner.segments", "{e}");
        let e = load_with("[inner]\ncapacity = \"12 parsecs\"\n", vec![]).unwrap_err();
        assert_eq!(e.key, "inner.capacity", "{e}");
        assert!(e.reason.contains("parsecs"), "{e}");
        let e = load_with("name = \n", vec![]).unwrap_err();
        assert!(e.reason.contains("TOML"), "{e}");
    }

    #[test]
    fn flags_name_their_keys_once() {
        #[derive(Serialize)]
        struct Flags {
            #[serde(skip)]
            _config: Option<PathBuf>,
            #[serde(rename = "inner.capacity")]
            capacity: Option<String>,
            #[serde(rename = "inner.segments")]
            segments: Option<u32>,
            #[serde(rename = "name")]
            name: Option<String>,
        }
        let flags = Flags {
            _config: Some("/x".into()),
            capacity: Some("1GiB".into()),
            segments: Some(7),
            name: None,
        };
        let o = flag_overrides(&flags).unwrap();
        let keys: Vec<&str> = o.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["inner.capacity", "inner.segments"]);
        let s = load_with("", o).unwrap();
        assert_eq!(s.inner.capacity, ByteSize::gib(1));
        assert_eq!(s.inner.segments, 7);
    }

    #[test]
    fn sizes_print_in_their_largest_exact_unit() {
        assert_eq!(ByteSize::gib(8).to_string(), "8GiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
