use std::fmt;
use std::str::FromStr;

/// A value that is not one of a closed set of names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what}: {value:?}")]
pub struct ParseError {
    pub what: &'static str,
    pub value: String,
}

/// The kind of work a job is; each has its own queue and worker binary so each scales alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InferenceType {
    Llm,
    Image,
    Video,
    Music,
    Tts,
}

impl InferenceType {
    pub const ALL: [InferenceType; 5] = [
        InferenceType::Llm,
        InferenceType::Image,
        InferenceType::Video,
        InferenceType::Music,
        InferenceType::Tts,
    ];

    /// The name in the public contract (`inference_type` field).
    pub fn as_str(self) -> &'static str {
        match self {
            InferenceType::Llm => "LLM",
            InferenceType::Image => "IMAGE",
            InferenceType::Video => "VIDEO",
            InferenceType::Music => "MUSIC",
            InferenceType::Tts => "TTS",
        }
    }

    /// Lower-case key used in queue names, routing keys and binary names.
    pub fn key(self) -> &'static str {
        match self {
            InferenceType::Llm => "llm",
            InferenceType::Image => "image",
            InferenceType::Video => "video",
            InferenceType::Music => "music",
            InferenceType::Tts => "tts",
        }
    }
}

impl fmt::Display for InferenceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InferenceType {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InferenceType::ALL
            .into_iter()
            .find(|t| t.as_str() == s || t.key() == s)
            .ok_or_else(|| ParseError {
                what: "inference type",
                value: s.to_owned(),
            })
    }
}

/// An endpoint a batch item may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    ImagesGenerations,
    VideosGenerations,
    MusicGenerations,
    AudioSpeech,
}

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::ImagesGenerations,
        Endpoint::VideosGenerations,
        Endpoint::MusicGenerations,
        Endpoint::AudioSpeech,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::ImagesGenerations => "/v1/images/generations",
            Endpoint::VideosGenerations => "/v1/videos/generations",
            Endpoint::MusicGenerations => "/v1/music/generations",
            Endpoint::AudioSpeech => "/v1/audio/speech",
        }
    }

    pub fn inference_type(self) -> InferenceType {
        match self {
            Endpoint::ChatCompletions | Endpoint::Completions => InferenceType::Llm,
            Endpoint::ImagesGenerations => InferenceType::Image,
            Endpoint::VideosGenerations => InferenceType::Video,
            Endpoint::MusicGenerations => InferenceType::Music,
            Endpoint::AudioSpeech => InferenceType::Tts,
        }
    }

    /// Whether `path` names an OpenAI-style endpoint that takes a file upload, which a batch
    /// cannot carry; these get their own message instead of "unknown endpoint".
    pub(crate) fn is_file_upload(path: &str) -> bool {
        const UPLOADS: [&str; 7] = [
            "/v1/images/edits",
            "/v1/images/variations",
            "/v1/audio/transcriptions",
            "/v1/audio/translations",
            "/v1/files",
            "/v1/uploads",
            "/v1/videos/edits",
        ];
        UPLOADS.contains(&path)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

impl FromStr for Endpoint {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::ALL
            .into_iter()
            .find(|e| e.path() == s)
            .ok_or_else(|| ParseError {
                what: "endpoint",
                value: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for e in Endpoint::ALL {
            assert_eq!(e.path().parse::<Endpoint>(), Ok(e));
        }
        for t in InferenceType::ALL {
            assert_eq!(t.as_str().parse::<InferenceType>(), Ok(t));
            assert_eq!(t.key().parse::<InferenceType>(), Ok(t));
        }
        assert!("/v1/embeddings".parse::<Endpoint>().is_err());
    }

    #[test]
    fn every_inference_type_has_an_endpoint() {
        for t in InferenceType::ALL {
            assert!(Endpoint::ALL.iter().any(|e| e.inference_type() == t));
        }
    }
}

/// A batch's priority: within its owner's share of a modality, higher runs first. Aging keeps
/// `Low` from waiting forever behind a steady stream of `High` (see batch-state's dispatcher).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// The stored rank: higher runs first.
    pub fn rank(self) -> i16 {
        match self {
            Priority::Low => -1,
            Priority::Normal => 0,
            Priority::High => 1,
        }
    }

    /// The priority a stored rank stands for (anything out of range is the nearest end).
    pub fn from_rank(rank: i16) -> Priority {
        match rank {
            i16::MIN..=-1 => Priority::Low,
            0 => Priority::Normal,
            1..=i16::MAX => Priority::High,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParseError {
                what: "priority",
                value: s.chars().take(64).collect(),
            })
    }
}
