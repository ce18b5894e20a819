//! Kernelspecs: the table of kernels Jupyter clients may start, by name. Each names the image
//! the kernel lives in and the command that starts it, so kernels of any language work when an
//! image has them. `python3` (the server's own kernel image) is the default.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::session::KernelCommand;
use crate::session::manager::DEFAULT_KERNEL_NAME;

/// One kernel clients can ask for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSpec {
    /// What clients show in their launcher.
    pub display_name: String,
    /// The kernel's language (`python`, `r`, …).
    #[serde(default = "python")]
    pub language: String,
    /// Container image (Docker backend); absent: the server's kernel image.
    #[serde(default)]
    pub image: Option<String>,
    /// The command starting the kernel, `{connection_file}` standing for the connection
    /// file's path; absent: ipykernel.
    #[serde(default)]
    pub argv: Vec<String>,
}

fn python() -> String {
    "python".to_owned()
}

/// Errors reading a kernelspec table.
#[derive(Debug, thiserror::Error)]
pub enum KernelSpecError {
    /// The file could not be read.
    #[error("cannot read kernelspecs file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid table.
    #[error("invalid kernelspecs file {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// The kernelspec table: every spec by name, and the default one.
#[derive(Debug, Clone)]
pub struct KernelSpecs {
    default: String,
    specs: BTreeMap<String, KernelSpec>,
}

/// The file format: `{"default": "python3", "kernelspecs": {"name": {...}}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecsFile {
    #[serde(default)]
    default: Option<String>,
    kernelspecs: BTreeMap<String, KernelSpec>,
}

impl Default for KernelSpecs {
    fn default() -> Self {
        let python = KernelSpec {
            display_name: "Python 3 (kernelbox)".to_owned(),
            language: python(),
            image: None,
            argv: Vec::new(),
        };
        Self {
            default: DEFAULT_KERNEL_NAME.to_owned(),
            specs: BTreeMap::from([(DEFAULT_KERNEL_NAME.to_owned(), python)]),
        }
    }
}

impl KernelSpecs {
    /// Reads a JSON table; `python3` is added when the file does not define it.
    pub fn from_file(path: &Path) -> Result<Self, KernelSpecError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KernelSpecError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_json(&text).map_err(|reason| KernelSpecError::Invalid {
            path: shown,
            reason,
        })
    }

    /// Parses a JSON table (see [`from_file`](Self::from_file)).
    pub fn from_json(text: &str) -> Result<Self, String> {
        let file: SpecsFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut specs = Self::default().specs;
        for (name, spec) in file.kernelspecs {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(format!(
                    "kernelspec name {name:?} must be letters, digits, '.', '_' or '-'"
                ));
            }
            specs.insert(name, spec);
        }
        let default = file
            .default
            .unwrap_or_else(|| DEFAULT_KERNEL_NAME.to_owned());
        if !specs.contains_key(&default) {
            return Err(format!("the default kernelspec {default:?} is not defined"));
        }
        Ok(Self { default, specs })
    }

    /// The default spec's name.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// The spec called `name`.
    pub fn get(&self, name: &str) -> Option<&KernelSpec> {
        self.specs.get(name)
    }

    /// Every spec's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.keys().map(String::as_str)
    }

    /// How the session layer starts the kernel of spec `name`.
    pub fn command(&self, name: &str) -> Option<KernelCommand> {
        self.get(name).map(|spec| KernelCommand {
            image: spec.image.clone(),
            argv: spec.argv.clone(),
        })
    }

    /// The Jupyter model of spec `name`: `{name, spec: {argv, display_name, language, …},
    /// resources}`.
    pub fn model(&self, name: &str) -> Option<Value> {
        let spec = self.get(name)?;
        let argv: Vec<String> = if spec.argv.is_empty() {
            [
                "python",
                "-m",
                "ipykernel_launcher",
                "-f",
                "{connection_file}",
            ]
            .map(str::to_owned)
            .to_vec()
        } else {
            spec.argv.clone()
        };
        Some(json!({
            "name": name,
            "spec": {
                "argv": argv,
                "display_name": spec.display_name,
                "language": spec.language,
                "interrupt_mode": "message",
                "env": {},
                "metadata": {},
            },
            "resources": {},
        }))
    }

    /// The body of `GET /api/kernelspecs`.
    pub fn listing(&self) -> Value {
        let specs: serde_json::Map<String, Value> = self
            .names()
            .filter_map(|n| Some((n.to_owned(), self.model(n)?)))
            .collect();
        json!({ "default": self.default, "kernelspecs": specs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python3_is_always_there_and_the_default() {
        let specs = KernelSpecs::from_json(
            r#"{"kernelspecs": {"r": {"display_name": "R", "language": "r",
                "image": "my-r-kernel", "argv": ["R", "--slave", "-e", "IRkernel::main()",
                "--args", "{connection_file}"]}}}"#,
        )
        .expect("valid");
        assert_eq!(specs.default_name(), "python3");
        assert_eq!(specs.names().collect::<Vec<_>>(), ["python3", "r"]);
        let r = specs.command("r").expect("r");
        assert_eq!(r.image.as_deref(), Some("my-r-kernel"));
        assert_eq!(
            r.argv_with("/c.json").last().map(String::as_str),
            Some("/c.json")
        );
        assert_eq!(specs.listing()["kernelspecs"]["r"]["spec"]["language"], "r");
    }

    #[test]
    fn bad_tables_say_what_is_wrong() {
        let err = KernelSpecs::from_json(r#"{"default": "julia", "kernelspecs": {}}"#)
            .expect_err("undefined default");
        assert!(err.contains("julia"), "{err}");
        let err = KernelSpecs::from_json(r#"{"kernelspecs": {"a/b": {"display_name": "x"}}}"#)
            .expect_err("bad name");
        assert!(err.contains("a/b"), "{err}");
        assert!(KernelSpecs::from_json("[]").is_err());
    }
}
