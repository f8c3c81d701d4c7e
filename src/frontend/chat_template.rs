//! The checkpoint's chat template, rendered with minijinja the way transformers renders it
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`). HF's non-standard
//! `{% generation %}` tags only mark assistant spans for training, so they are removed before parsing.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;
use std::path::Path;

use super::FrontendError;

/// One message as the template sees it: `content` is a list of `{"type": "text"|"image"}` parts.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateMessage {
    pub role: &'static str,
    pub content: Vec<TemplatePart>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TemplatePart {
    Text { text: String },
    Image,
}

pub struct ChatTemplate {
    env: Environment<'static>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Loads the template from `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`,
    /// the first that has one.
    pub fn from_checkpoint(dir: &Path) -> Result<Self, FrontendError> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return Self::new(&read(&jinja)?);
        }
        for name in ["chat_template.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json: serde_json::Value = serde_json::from_str(&read(&path)?).map_err(|e| {
                FrontendError::Config(format!("{} is not valid JSON: {e}", path.display()))
            })?;
            if let Some(source) = template_source(json.get("chat_template")) {
                return Self::new(&source);
            }
        }
        Err(FrontendError::Config(format!(
            "{} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)",
            dir.display()
        )))
    }

    pub fn new(source: &str) -> Result<Self, FrontendError> {
        let generation_tags =
            regex::Regex::new(r"\{%-?\s*(end)?generation\s*-?%\}").expect("the pattern is valid");
        let source = generation_tags.replace_all(source, "").into_owned();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| FrontendError::Template(format!("chat template does not parse: {e}")))?;
        Ok(Self { env })
    }

    pub fn render(
        &self,
        messages: &[TemplateMessage],
        bos_token: &str,
        eos_token: &str,
        add_generation_prompt: bool,
    ) -> Result<String, FrontendError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("added at construction");
        tmpl.render(minijinja::context! {
            messages => messages,
            bos_token => bos_token,
            eos_token => eos_token,
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(|e| FrontendError::Template(format!("chat template failed: {e}")))
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn template_source(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_owned),
        _ => None,
    }
}

fn read(path: &Path) -> Result<String, FrontendError> {
    std::fs::read_to_string(path)
        .map_err(|e| FrontendError::Config(format!("cannot read {}: {e}", path.display())))
}
