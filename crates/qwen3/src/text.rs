//! Text in and out: the checkpoint's tokenizer (`tokenizer.json`, Hugging Face `tokenizers`), its
//! chat template (Jinja in `tokenizer_config.json`, rendered by minijinja with Python string
//! methods), and incremental detokenisation for streaming.
use std::path::Path;

use qfuse_core::{Error, Result};
use serde_json::Value;

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A tokenizer with its chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Model(what.to_string())
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, the chat template of `dir/tokenizer_config.json`.
    ///
    /// # Errors
    /// A missing or malformed `tokenizer.json`, or a malformed `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read(&path).map_err(|e| {
            bad(format!(
                "{}: {e} (the tokenizer is needed for text prompts)",
                path.display()
            ))
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(bad(format!("{}: {e}", cfg_path.display()))),
        };
        Self::from_bytes(&json, config.as_deref())
            .map_err(|e| bad(format!("{}: {e}", dir.display())))
    }

    /// A tokenizer from the bytes of `tokenizer.json` and the text of `tokenizer_config.json`.
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config: Option<&str>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| bad(format!("tokenizer.json is not a valid tokenizer: {e}")))?;
        let chat_template = match tokenizer_config {
            None => None,
            Some(text) => {
                let v: Value = serde_json::from_str(text)
                    .map_err(|e| bad(format!("tokenizer_config.json: invalid JSON: {e}")))?;
                match v.get("chat_template") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(t)) => Some(t.clone()),
                    Some(other) => {
                        return Err(bad(format!(
                            "tokenizer_config.json: `chat_template` must be a string, got {}",
                            other.to_string().chars().take(40).collect::<String>()
                        )))
                    }
                }
            }
        };
        Ok(Tokenizer {
            inner,
            chat_template,
        })
    }

    /// Token ids of `text`; special-token markup in it (`<|im_start|>`) becomes the special ids. No
    /// BOS is added (Qwen3 has none).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| bad(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| bad(format!("detokenizing: {e}")))
    }

    /// The id of a token's exact text (e.g. `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Entries in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the checkpoint ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The chat template rendered for `messages`, as transformers' `apply_chat_template(...,
    /// tokenize=False)` would: `add_generation_prompt` opens the assistant's turn;
    /// `enable_thinking = Some(false)` is the template's switch for an empty think block.
    ///
    /// # Errors
    /// No template, or one that fails to render (the message says why).
    pub fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| bad("this checkpoint has no chat template"))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| bad(format!("chat template does not parse: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| bad(format!("chat template: {e}")))?;
        let ctx = match enable_thinking {
            Some(t) => {
                minijinja::context! { messages => messages, add_generation_prompt => add_generation_prompt, enable_thinking => t }
            }
            None => {
                minijinja::context! { messages => messages, add_generation_prompt => add_generation_prompt }
            }
        };
        tmpl.render(ctx)
            .map_err(|e| bad(format!("chat template failed to render: {e}")))
    }
}

/// Turns generated ids into text as they arrive, never splitting a multi-byte character: what
/// it emits, concatenated, is the one-shot decode of all the ids.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
    skip_special: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder with no ids yet.
    pub fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        StreamDecoder {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
            skip_special,
        }
    }

    /// Adds one id; returns the text it completes (empty while a character is still partial).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special)?;
        // A byte-level BPE token may end inside a UTF-8 sequence: the decoder shows U+FFFD there.
        if text.ends_with('\u{FFFD}') || !text.is_char_boundary(self.emitted.min(text.len())) {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(new)
    }

    /// Whatever is left (a trailing partial character decodes as U+FFFD, as the one-shot does).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids, self.skip_special)?;
        let rest = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(rest)
    }
}
