//! `response_format` (chat and completions, OpenAI's shape) as the `OutputFormat` structured outputs
//! serve. The schema itself is checked where it is compiled (`frontend::structured`), whose errors
//! are 400s too.

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
