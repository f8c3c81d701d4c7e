//! The conversation templates of the original LLaVA code (`llava/conversation.py` of llava-torch
//! 1.2.2), as data, rendered as its `Conversation.get_prompt()` renders them, for original-format
//! checkpoints (llava-hf checkpoints carry a Jinja chat template instead). The template is chosen by
//! name, or inferred from the model's name exactly as the original `run_llava.py` does.

use super::FrontendError;

/// `SeparatorStyle` of the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Single,
    Two,
    Mpt,
    Plain,
    Llama2,
}

/// One template of `conv_templates`.
#[derive(Debug)]
pub struct ConvTemplate {
    pub name: &'static str,
    /// Text the system sentence sits in (`<|im_start|>system\n` for the ChatML-like styles).
    system_prefix: &'static str,
    /// The default system sentence; an OpenAI `system` message replaces it.
    system: &'static str,
    roles: [&'static str; 2],
    style: Style,
    sep: &'static str,
    sep2: &'static str,
    /// Turns the template starts with (only `vicuna_v0`'s example exchange).
    preset: &'static [&'static str],
}

const HUMAN_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";
const USER_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
const MMTAG_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.The visual content will be provided with the following format: <Image>visual content</Image>.";
const LLAMA_2_SYSTEM: &str = "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.";
const LLAVA_LLAMA_2_SYSTEM: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";
const CHATML_PREFIX: &str = "<|im_start|>system\n";
const VICUNA_V0_EXAMPLE: &[&str] = &[
    "What are the key differences between renewable and non-renewable energy sources?",
    "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences between renewable and non-renewable energy sources:\n1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are finite and will eventually run out.\n2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower operational costs than non-renewable sources.\n4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations than non-renewable sources.\n5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations and needs, while non-renewable sources are more rigid and inflexible.\n6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
];

const fn template(
    name: &'static str,
    system: &'static str,
    roles: [&'static str; 2],
    style: Style,
    sep: &'static str,
    sep2: &'static str,
) -> ConvTemplate {
    ConvTemplate {
        name,
        system_prefix: "",
        system,
        roles,
        style,
        sep,
        sep2,
        preset: &[],
    }
}

const CHAT_ROLES: [&str; 2] = ["USER", "ASSISTANT"];
const HUMAN_ROLES: [&str; 2] = ["Human", "Assistant"];
const CHATML_ROLES: [&str; 2] = ["<|im_start|>user\n", "<|im_start|>assistant\n"];

/// Every name of the original `conv_templates` (aliases included).
pub static TEMPLATES: &[ConvTemplate] = &[
    ConvTemplate {
        preset: VICUNA_V0_EXAMPLE,
        ..template("default", HUMAN_SYSTEM, HUMAN_ROLES, Style::Single, "###", "")
    },
    ConvTemplate {
        preset: VICUNA_V0_EXAMPLE,
        ..template("v0", HUMAN_SYSTEM, HUMAN_ROLES, Style::Single, "###", "")
    },
    template("v1", USER_SYSTEM, CHAT_ROLES, Style::Two, " ", "</s>"),
    template("vicuna_v1", USER_SYSTEM, CHAT_ROLES, Style::Two, " ", "</s>"),
    template("llama_2", LLAMA_2_SYSTEM, CHAT_ROLES, Style::Llama2, "<s>", "</s>"),
    template("mistral_instruct", "", CHAT_ROLES, Style::Llama2, "", "</s>"),
    ConvTemplate {
        system_prefix: CHATML_PREFIX,
        ..template("chatml_direct", "Answer the questions.", CHATML_ROLES, Style::Mpt, "<|im_end|>", "")
    },
    ConvTemplate {
        system_prefix: CHATML_PREFIX,
        ..template("mistral_direct", "Answer the questions.", CHATML_ROLES, Style::Mpt, "<|im_end|>", "")
    },
    template("plain", "", ["", ""], Style::Plain, "\n", ""),
    template("v0_plain", "", ["", ""], Style::Plain, "\n", ""),
    template("llava_v0", HUMAN_SYSTEM, HUMAN_ROLES, Style::Single, "###", ""),
    template("v0_mmtag", MMTAG_SYSTEM, HUMAN_ROLES, Style::Single, "###", ""),
    template("llava_v1", HUMAN_SYSTEM, CHAT_ROLES, Style::Two, " ", "</s>"),
    template("v1_mmtag", MMTAG_SYSTEM, CHAT_ROLES, Style::Two, " ", "</s>"),
    template("llava_llama_2", LLAVA_LLAMA_2_SYSTEM, CHAT_ROLES, Style::Llama2, "<s>", "</s>"),
    ConvTemplate {
        system_prefix: CHATML_PREFIX,
        ..template(
            "mpt",
            "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.",
            CHATML_ROLES,
            Style::Mpt,
            "<|im_end|>",
            "",
        )
    },
];

/// The template `run_llava.py` picks for a model name.
pub fn infer_template_name(model_name: &str) -> &'static str {
    let name = model_name.to_lowercase();
    if name.contains("llama-2") {
        "llava_llama_2"
    } else if name.contains("mistral") {
        "mistral_instruct"
    } else if name.contains("v1.6-34b") {
        "chatml_direct"
    } else if name.contains("v1") {
        "llava_v1"
    } else if name.contains("mpt") {
        "mpt"
    } else {
        "llava_v0"
    }
}

/// A turn as the template sees it: who speaks, and the text (images already turned into markers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub assistant: bool,
    pub text: String,
}

impl ConvTemplate {
    pub fn by_name(name: &str) -> Result<&'static ConvTemplate, FrontendError> {
        TEMPLATES.iter().find(|t| t.name == name).ok_or_else(|| {
            let names: Vec<&str> = TEMPLATES.iter().map(|t| t.name).collect();
            FrontendError::Config(format!(
                "unknown conversation template {name:?}; the original code has {}",
                names.join(", ")
            ))
        })
    }

    /// Strings whose appearance ends the answer, as the original CLI's stopping criterion: the
    /// separator, or `sep2` for the two-separator style (EOS, which ends generation anyway).
    pub fn stop_strings(&self) -> Vec<String> {
        let stop = match self.style {
            Style::Two => self.sep2,
            _ => self.sep,
        };
        match stop {
            "" | "</s>" | "<s>" => Vec::new(),
            s => vec![s.to_owned()],
        }
    }

    /// `get_prompt()` over the turns, `system` replacing the template's sentence; with
    /// `add_generation_prompt`, an empty assistant turn at the end (`append_message(roles[1], None)`).
    pub fn render(
        &self,
        system: Option<&str>,
        turns: &[Turn],
        add_generation_prompt: bool,
    ) -> Result<String, FrontendError> {
        let mut messages: Vec<(&str, &str)> = self
            .preset
            .iter()
            .enumerate()
            .map(|(i, text)| (self.roles[i % 2], *text))
            .collect();
        for turn in turns {
            messages.push((self.roles[usize::from(turn.assistant)], turn.text.as_str()));
        }
        if add_generation_prompt {
            messages.push((self.roles[1], ""));
        }
        let system = format!("{}{}", self.system_prefix, system.unwrap_or(self.system));
        // The original tests `if message:`: an empty text renders like the open generation turn.
        let mut ret = String::new();
        match self.style {
            Style::Single | Style::Two => {
                let seps = [
                    self.sep,
                    if self.style == Style::Two {
                        self.sep2
                    } else {
                        self.sep
                    },
                ];
                ret.push_str(&system);
                ret.push_str(self.sep);
                for (i, (role, message)) in messages.iter().enumerate() {
                    if message.is_empty() {
                        ret.push_str(role);
                        ret.push(':');
                    } else {
                        ret.push_str(&format!("{role}: {message}{}", seps[i % 2]));
                    }
                }
            }
            Style::Mpt => {
                ret.push_str(&system);
                ret.push_str(self.sep);
                for (role, message) in &messages {
                    ret.push_str(role);
                    if !message.is_empty() {
                        ret.push_str(message);
                        ret.push_str(self.sep);
                    }
                }
            }
            Style::Plain => {
                let seps = [self.sep, self.sep2];
                ret.push_str(&system);
                for (i, (_, message)) in messages.iter().enumerate() {
                    if !message.is_empty() {
                        ret.push_str(message);
                        ret.push_str(seps[i % 2]);
                    }
                }
            }
            Style::Llama2 => {
                if messages
                    .first()
                    .is_none_or(|(role, m)| m.is_empty() || *role != self.roles[0])
                {
                    return Err(FrontendError::Template(
                        "this conversation template needs a non-empty user message first".into(),
                    ));
                }
                let system = if system.is_empty() {
                    system
                } else {
                    format!("<<SYS>>\n{system}\n<</SYS>>\n\n")
                };
                for (i, (_, message)) in messages.iter().enumerate() {
                    if message.is_empty() {
                        continue;
                    }
                    if i % 2 == 0 {
                        let message = if i == 0 {
                            format!("{system}{message}")
                        } else {
                            message.to_string()
                        };
                        ret.push_str(&format!("{}[INST] {message} [/INST]", self.sep));
                    } else {
                        ret.push_str(&format!(" {message} {}", self.sep2));
                    }
                }
                // Python's `lstrip(sep)` strips any of sep's characters, not the string.
                let sep_chars: Vec<char> = self.sep.chars().collect();
                ret = ret.trim_start_matches(&sep_chars[..]).to_owned();
            }
        }
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assistant(text: &str) -> Turn {
        Turn {
            assistant: true,
            text: text.into(),
        }
    }

    fn user(text: &str) -> Turn {
        Turn {
            assistant: false,
            text: text.into(),
        }
    }

    #[test]
    fn names_are_inferred_as_run_llava_does() {
        assert_eq!(infer_template_name("llava-v1.5-7b"), "llava_v1");
        assert_eq!(
            infer_template_name("llava-llama-2-13b-chat-lightning-preview"),
            "llava_llama_2"
        );
        assert_eq!(
            infer_template_name("llava-v1.6-mistral-7b"),
            "mistral_instruct"
        );
        assert_eq!(infer_template_name("llava-v1.6-34b"), "chatml_direct");
        assert_eq!(infer_template_name("LLaVA-7b-delta-v0"), "llava_v0");
        assert_eq!(infer_template_name("llava-mpt-7b"), "mpt");
    }

    #[test]
    fn two_separator_prompt() {
        let t = ConvTemplate::by_name("llava_v1").unwrap();
        let prompt = t
            .render(None, &[user("<image>\nWhat is it?")], true)
            .unwrap();
        assert_eq!(
            prompt,
            format!("{HUMAN_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:")
        );
        assert!(t.stop_strings().is_empty());
    }

    #[test]
    fn single_separator_prompt_and_stop() {
        let t = ConvTemplate::by_name("llava_v0").unwrap();
        let turns = [user("Hi"), assistant("Hello"), user("Bye")];
        let prompt = t.render(Some("Be brief."), &turns, true).unwrap();
        assert_eq!(
            prompt,
            "Be brief.###Human: Hi###Assistant: Hello###Human: Bye###Assistant:"
        );
        assert_eq!(t.stop_strings(), vec!["###".to_string()]);
    }

    #[test]
    fn llama_2_prompt_strips_the_leading_separator() {
        let t = ConvTemplate::by_name("llava_llama_2").unwrap();
        let turns = [user("Hi"), assistant("Hello"), user("Bye")];
        let prompt = t.render(Some("S"), &turns, true).unwrap();
        assert_eq!(
            prompt,
            "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]"
        );
        assert!(t.render(None, &[], true).is_err());
    }

    #[test]
    fn chatml_keeps_its_system_header() {
        let t = ConvTemplate::by_name("chatml_direct").unwrap();
        let prompt = t.render(Some("Be brief."), &[user("Hi")], true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
        );
        assert_eq!(t.stop_strings(), vec!["<|im_end|>".to_string()]);
    }
}
