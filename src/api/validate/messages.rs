//! Chat messages → the frontend's messages and the images' URLs, in order of appearance.

use crate::api::error::ApiError;
use crate::api::wire::{ChatMessage as WireMessage, ContentPart, MessageContent};
use crate::frontend::{ChatMessage, MessagePart, Role};

/// Chat messages → the frontend's messages and the image URLs in order of appearance.
pub(super) fn chat_messages(
    messages: &[WireMessage],
) -> Result<(Vec<ChatMessage>, Vec<String>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must not be empty",
            "messages",
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut urls = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::InvalidRequest {
                    message: format!(
                        "messages[{i}].role {other:?} is not supported (system, user, assistant)"
                    ),
                    param: Some(format!("messages[{i}].role")),
                })
            }
        };
        let parts = match &m.content {
            None if role == Role::Assistant => Vec::new(),
            None => {
                return Err(ApiError::InvalidRequest {
                    message: format!("messages[{i}].content is required"),
                    param: Some(format!("messages[{i}].content")),
                })
            }
            // A plain string is one text part (HF's template would silently drop it).
            Some(MessageContent::Text(t)) => vec![MessagePart::Text(t.clone())],
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text } => Ok(MessagePart::Text(text.clone())),
                    ContentPart::ImageUrl { image_url } => {
                        if let Some(detail) = &image_url.detail {
                            if !super::IMAGE_DETAILS.contains(&detail.as_str()) {
                                return Err(ApiError::InvalidRequest {
                                    message: format!(
                                        "messages[{i}]: image detail {detail:?} is not one of auto, low, high"
                                    ),
                                    param: Some(format!("messages[{i}].content")),
                                });
                            }
                        }
                        urls.push(image_url.url.clone());
                        Ok(MessagePart::Image)
                    }
                })
                .collect::<Result<_, ApiError>>()?,
        };
        if role != Role::User && parts.contains(&MessagePart::Image) {
            return Err(ApiError::InvalidRequest {
                message: format!("messages[{i}]: images are only allowed in user messages"),
                param: Some(format!("messages[{i}].content")),
            });
        }
        out.push(ChatMessage { role, parts });
    }
    Ok((out, urls))
}
