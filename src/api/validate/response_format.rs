//! `response_format` (chat and completions, OpenAI's shape) and vLLM's `structured_outputs` as the
//! `OutputFormat` structured outputs serve. The schema, expression or grammar itself is checked where
//! it is compiled (`frontend::structured`), whose errors are 400s too.

use serde_json::Value;

use crate::api::error::ApiError;
use crate::types::OutputFormat;

/// OpenAI's rule for `json_schema.name`.
pub const MAX_SCHEMA_NAME: usize = 64;

/// `None` for free text (absent, `null` or `{"type": "text"}`).
pub fn response_format(value: Option<&Value>) -> Result<Option<OutputFormat>, ApiError> {
    let invalid = |message: String| ApiError::invalid(message, "response_format");
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = value.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => {
            let spec = value.get("json_schema").ok_or_else(|| {
                invalid("`response_format` of type `json_schema` needs `json_schema`".into())
            })?;
            if !spec.is_object() {
                return Err(invalid(
                    "`response_format.json_schema` must be an object".into(),
                ));
            }
            let name = spec.get("name").and_then(Value::as_str).unwrap_or_default();
            let name_ok = (1..=MAX_SCHEMA_NAME).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err(invalid(format!(
                    "`response_format.json_schema.name` must be 1 to {MAX_SCHEMA_NAME} letters, \
                     digits, `_` or `-`"
                )));
            }
            for (field, ok) in [
                ("strict", Value::is_boolean as fn(&Value) -> bool),
                ("description", Value::is_string),
            ] {
                if spec.get(field).is_some_and(|v| !v.is_null() && !ok(v)) {
                    return Err(invalid(format!(
                        "`response_format.json_schema.{field}` has the wrong type"
                    )));
                }
            }
            match spec.get("schema") {
                Some(schema @ Value::Object(_)) => {
                    Ok(Some(OutputFormat::JsonSchema(schema.clone())))
                }
                _ => Err(invalid(
                    "`response_format.json_schema.schema` must be a JSON Schema object".into(),
                )),
            }
        }
        _ => Err(invalid(
            "`response_format.type` must be `text`, `json_object` or `json_schema`".into(),
        )),
    }
}

/// vLLM's `structured_outputs`: exactly one of `json` (a schema, or its JSON text), `regex`,
/// `choice`, `grammar` (Lark, as llguidance reads it) or `json_object: true`. Its options the server
/// follows anyway pass (`disable_any_whitespace`: JSON is always compact; `disable_fallback`: there is
/// no fallback); the others, and unknown keys, are refused by name.
pub fn structured_outputs(value: Option<&Value>) -> Result<Option<OutputFormat>, ApiError> {
    let invalid = |message: String| ApiError::invalid(message, "structured_outputs");
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(fields) = value.as_object() else {
        return Err(invalid("`structured_outputs` must be an object".into()));
    };
    let mut formats = Vec::new();
    for (key, v) in fields.iter().filter(|(_, v)| !v.is_null()) {
        let wrong = || invalid(format!("`structured_outputs.{key}` has the wrong type"));
        match key.as_str() {
            "json" => formats.push(match v {
                Value::Object(_) => OutputFormat::JsonSchema(v.clone()),
                Value::String(text) => match serde_json::from_str::<Value>(text) {
                    Ok(schema @ Value::Object(_)) => OutputFormat::JsonSchema(schema),
                    _ => {
                        return Err(invalid(
                            "`structured_outputs.json` is not a JSON Schema object".into(),
                        ))
                    }
                },
                _ => return Err(wrong()),
            }),
            "regex" => formats.push(OutputFormat::Regex(
                v.as_str().ok_or_else(wrong)?.to_owned(),
            )),
            "grammar" => formats.push(OutputFormat::Grammar(
                v.as_str().ok_or_else(wrong)?.to_owned(),
            )),
            "choice" => {
                let choices: Option<Vec<String>> = v
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_owned)).collect());
                formats.push(OutputFormat::Choice(choices.ok_or_else(|| {
                    invalid(
                        "`structured_outputs.choice` must be a non-empty list of strings".into(),
                    )
                })?));
            }
            "json_object" => match v.as_bool() {
                Some(true) => formats.push(OutputFormat::JsonObject),
                Some(false) => {}
                None => return Err(wrong()),
            },
            "disable_any_whitespace" | "disable_fallback" if v.is_boolean() => {}
            "disable_any_whitespace" | "disable_fallback" => return Err(wrong()),
            other => {
                return Err(invalid(format!(
                    "`structured_outputs.{other}` is not supported by this server"
                )))
            }
        }
    }
    match formats.len() {
        1 => Ok(formats.pop()),
        _ => Err(invalid(
            "`structured_outputs` takes exactly one of `json`, `regex`, `choice`, `grammar` and \
             `json_object`"
                .into(),
        )),
    }
}

/// The Responses API's `text.format` in chat's shape (its `json_schema` fields sit beside `type`).
pub fn from_text_format(format: &Value) -> Value {
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return format.clone();
    }
    let mut spec = format.clone();
    if let Some(object) = spec.as_object_mut() {
        object.remove("type");
    }
    serde_json::json!({"type": "json_schema", "json_schema": spec})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(v: Value) -> Result<Option<OutputFormat>, String> {
        response_format(Some(&v)).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn openai_shapes_are_read() {
        assert_eq!(read(json!(null)), Ok(None));
        assert_eq!(read(json!({"type": "text"})), Ok(None));
        assert_eq!(
            read(json!({"type": "json_object"})),
            Ok(Some(OutputFormat::JsonObject))
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        assert_eq!(
            read(json!({"type": "json_schema",
                        "json_schema": {"name": "A-b_1", "strict": true, "schema": schema}})),
            Ok(Some(OutputFormat::JsonSchema(schema)))
        );
    }

    #[test]
    fn malformed_formats_are_refused() {
        for bad in [
            json!({"type": "json"}),
            json!({}),
            json!("json_object"),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "x".repeat(65), "schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "a", "schema": true}}),
            json!({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes", "schema": {}}}),
        ] {
            assert!(read(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn vllm_structured_outputs_are_read() {
        let read = |v: Value| structured_outputs(Some(&v)).map_err(|e| format!("{e:?}"));
        let schema = json!({"type": "object"});
        assert_eq!(
            read(json!({"json": schema})),
            Ok(Some(OutputFormat::JsonSchema(schema.clone())))
        );
        assert_eq!(
            read(json!({"json": "{\"type\": \"object\"}", "disable_any_whitespace": true})),
            Ok(Some(OutputFormat::JsonSchema(schema)))
        );
        assert_eq!(
            read(json!({"regex": "a+"})),
            Ok(Some(OutputFormat::Regex("a+".into())))
        );
        assert_eq!(
            read(json!({"choice": ["yes", "no"], "regex": null})),
            Ok(Some(OutputFormat::Choice(vec!["yes".into(), "no".into()])))
        );
        assert_eq!(
            read(json!({"grammar": "start: \"x\""})),
            Ok(Some(OutputFormat::Grammar("start: \"x\"".into())))
        );
        assert_eq!(
            read(json!({"json_object": true})),
            Ok(Some(OutputFormat::JsonObject))
        );
        for bad in [
            json!({}),
            json!({"regex": "a", "choice": ["a"]}),
            json!({"choice": []}),
            json!({"choice": [1]}),
            json!({"json": "not json"}),
            json!({"regex": 5}),
            json!({"structural_tag": "x"}),
            json!({"regex": "a", "whitespace_pattern": " "}),
            json!("regex"),
        ] {
            assert!(read(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_format_moves_its_schema_fields_under_json_schema() {
        let format = json!({"type": "json_schema", "name": "n", "schema": {"type": "object"}});
        assert_eq!(
            from_text_format(&format),
            json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}})
        );
        assert_eq!(
            from_text_format(&json!({"type": "json_object"})),
            json!({"type": "json_object"})
        );
    }
}
