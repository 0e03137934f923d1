//! The shipped Qwen3 tokenizer and chat template against the Python `tokenizers` package and
//! transformers' `apply_chat_template` (expectations from tools/golden/make_text_golden.py).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::{Path, PathBuf};

use qfuse_qwen3::{Message, StreamDecoder, Tokenizer};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&root().join("assets/qwen3-tokenizer")).unwrap()
}

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/text").join(name)).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn ids_and_decodes_match_python_tokenizers() {
    let tok = tokenizer();
    for case in fixture("tokenize.json")["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(tok.token_id("<|im_end|>"), Some(151645));
    assert_eq!(tok.token_id("<|endoftext|>"), Some(151643));
}

#[test]
fn streaming_never_splits_a_character_and_equals_the_one_shot_decode() {
    let tok = tokenizer();
    for case in fixture("tokenize.json")["cases"].as_array().unwrap() {
        let want = ids(&case["ids"]);
        let mut stream = StreamDecoder::new(&tok, false);
        let mut pieces = Vec::new();
        for &id in &want {
            pieces.push(stream.push(id).unwrap());
        }
        pieces.push(stream.finish().unwrap());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), tok.decode(&want, false).unwrap());
    }
    // U+1FAE0 is four bytes spread over three byte-level tokens: nothing shows until it is whole.
    let emoji = tok.encode("🫠").unwrap();
    assert_eq!(emoji.len(), 3, "{emoji:?}");
    let mut stream = StreamDecoder::new(&tok, false);
    let shown: Vec<String> = emoji.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert!(
        shown[..shown.len() - 1].iter().all(String::is_empty),
        "{shown:?}"
    );
    assert_eq!(shown.last().unwrap(), "🫠");
}

#[test]
fn chat_prompts_match_transformers_apply_chat_template() {
    let tok = tokenizer();
    let cases = fixture("chat.json");
    for case in cases["cases"].as_array().unwrap() {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = tok
            .render_chat(
                &messages,
                case["add_generation_prompt"].as_bool().unwrap(),
                case["enable_thinking"].as_bool(),
            )
            .unwrap();
        assert_eq!(
            got,
            case["text"].as_str().unwrap(),
            "{} (gen {}, thinking {})",
            case["name"],
            case["add_generation_prompt"],
            case["enable_thinking"]
        );
    }
}

#[test]
fn bad_tokenizer_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::write(
        dir.path().join("tokenizer.json"),
        "{\"not\": \"a tokenizer\"}",
    )
    .unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(err.contains("not a valid tokenizer"), "{err}");
    std::fs::copy(
        root().join("assets/qwen3-tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        "{\"chat_template\": \"{% if %}\"}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let err = tok
        .render_chat(&[Message::new("user", "hi")], true, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat template does not parse"), "{err}");
}
