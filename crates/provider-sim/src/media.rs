//! Real media (PNG, WAV, MP4) produced cheaply, plus zero-padding up to a
//! requested size that is streamed rather than allocated.
//!
//! A [`Media`] is a small valid prefix (`head`), a run of zero bytes (`pad`)
//! and an optional trailer; only `head` lives in memory, so a 512 MiB file
//! costs a few KiB until it is downloaded.

use crate::error::ApiError;
use base64::Engine as _;
use bytes::Bytes;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// Upper bound for `sim_media_bytes`.
pub(crate) const MAX_MEDIA_BYTES: u64 = 512 * 1024 * 1024;

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
/// Ancillary, private, safe-to-copy chunk type: decoders skip it.
const PNG_PAD_TYPE: &[u8; 4] = b"vsIm";
const PNG_IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];
/// CRC (4) + IEND chunk (12) that follow the PNG padding chunk's data.
const PNG_TRAILER_LEN: u64 = 16;

/// A tiny real H.264 MP4 (64x64, 1 s), generated once with ffmpeg; encoding
/// video at request time would be far too heavy for a simulator.
const TINY_MP4: &[u8] = include_bytes!("../assets/sim.mp4");

pub(crate) const PNG_TYPE: &str = "image/png";
pub(crate) const WAV_TYPE: &str = "audio/wav";
pub(crate) const MP4_TYPE: &str = "video/mp4";

#[derive(Clone, Debug)]
pub(crate) struct Media {
    pub content_type: &'static str,
    head: Bytes,
    pad: u64,
    png_trailer: bool,
}

impl Media {
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.pad + if self.png_trailer { PNG_TRAILER_LEN } else { 0 }
    }

    /// Bytes actually held in memory.
    pub(crate) fn resident_bytes(&self) -> usize {
        self.head.len()
    }

    pub fn extension(&self) -> &'static str {
        match self.content_type {
            PNG_TYPE => "png",
            WAV_TYPE => "wav",
            _ => "mp4",
        }
    }

    pub fn chunks(&self) -> MediaChunks {
        let crc = self.png_trailer.then(|| {
            let mut h = crc32fast::Hasher::new();
            h.update(PNG_PAD_TYPE);
            h
        });
        MediaChunks {
            head: Some(self.head.clone()),
            remaining: self.pad,
            crc,
            done: false,
        }
    }

    pub(crate) fn base64_len(&self) -> u64 {
        self.len().div_ceil(3) * 4
    }

    pub(crate) fn base64_chunks(&self) -> Base64Chunks<MediaChunks> {
        Base64Chunks {
            inner: self.chunks(),
            carry: Vec::new(),
            done: false,
        }
    }

    /// A PNG grown to at least `target` bytes with one padding chunk before IEND.
    pub fn png(encoded: Vec<u8>, target: u64) -> Result<Self, ApiError> {
        let base = encoded.len() as u64;
        if target <= base {
            return Ok(Self::plain(PNG_TYPE, encoded));
        }
        let Some(body) = encoded.strip_suffix(&PNG_IEND) else {
            return Err(ApiError::internal("encoded PNG lacks IEND"));
        };
        // The padding chunk adds 12 bytes of framing (length, type, CRC).
        let pad = (target - base).saturating_sub(12);
        let pad_len = u32::try_from(pad).map_err(|_| ApiError::internal("padding too large"))?;
        let mut head = Vec::with_capacity(body.len() + 8);
        head.extend_from_slice(body);
        head.extend_from_slice(&pad_len.to_be_bytes());
        head.extend_from_slice(PNG_PAD_TYPE);
        Ok(Self {
            content_type: PNG_TYPE,
            head: head.into(),
            pad,
            png_trailer: true,
        })
    }

    /// 16-bit PCM mono 16 kHz tone; padding is extra silence inside `data`.
    pub fn wav(duration_ms: u64, freq_hz: f32, target: u64) -> Result<Self, ApiError> {
        const RATE: u32 = 16_000;
        let samples = (u64::from(RATE) * duration_ms / 1000).max(1) as usize;
        let fade = (RATE as usize / 100).min(samples / 2).max(1);
        let mut pcm = Vec::with_capacity(samples * 2);
        // The tone as a phasor turned by a fixed step each sample: a multiply-add per sample
        // instead of a `sin`, so a simulated provider at zero latency stays cheap.
        let step = f64::from(freq_hz) * std::f64::consts::TAU / f64::from(RATE);
        let (step_sin, step_cos) = step.sin_cos();
        let (mut re, mut im) = (1.0f64, 0.0f64);
        for i in 0..samples {
            // Short linear fade in/out avoids clicks; amplitude ~30% FS.
            let env = (i.min(samples - 1 - i) as f64 / fade as f64).min(1.0);
            let v = im * env * 10_000.0;
            pcm.extend_from_slice(&(v as i16).to_le_bytes());
            (re, im) = (re * step_cos - im * step_sin, re * step_sin + im * step_cos);
        }
        let base = 44 + pcm.len() as u64;
        let mut pad = target.saturating_sub(base);
        pad += pad % 2; // whole 16-bit samples
        let data_len = u32::try_from(pcm.len() as u64 + pad)
            .map_err(|_| ApiError::internal("wav too large"))?;
        let mut head = Vec::with_capacity(44 + pcm.len());
        head.extend_from_slice(b"RIFF");
        head.extend_from_slice(&(36 + data_len).to_le_bytes());
        head.extend_from_slice(b"WAVEfmt ");
        head.extend_from_slice(&16u32.to_le_bytes());
        head.extend_from_slice(&1u16.to_le_bytes()); // PCM
        head.extend_from_slice(&1u16.to_le_bytes()); // mono
        head.extend_from_slice(&RATE.to_le_bytes());
        head.extend_from_slice(&(RATE * 2).to_le_bytes()); // byte rate
        head.extend_from_slice(&2u16.to_le_bytes()); // block align
        head.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
        head.extend_from_slice(b"data");
        head.extend_from_slice(&data_len.to_le_bytes());
        head.extend_from_slice(&pcm);
        Ok(Self {
            content_type: WAV_TYPE,
            head: head.into(),
            pad,
            png_trailer: false,
        })
    }

    /// The bundled MP4; padding is a trailing top-level `free` box, which
    /// ISO-BMFF readers skip.
    pub fn mp4(target: u64) -> Result<Self, ApiError> {
        let base = TINY_MP4.len() as u64;
        if target <= base {
            return Ok(Self {
                content_type: MP4_TYPE,
                head: Bytes::from_static(TINY_MP4),
                pad: 0,
                png_trailer: false,
            });
        }
        let pad = (target - base).saturating_sub(8);
        let box_len =
            u32::try_from(pad + 8).map_err(|_| ApiError::internal("mp4 padding too large"))?;
        let mut head = Vec::with_capacity(TINY_MP4.len() + 8);
        head.extend_from_slice(TINY_MP4);
        head.extend_from_slice(&box_len.to_be_bytes());
        head.extend_from_slice(b"free");
        Ok(Self {
            content_type: MP4_TYPE,
            head: head.into(),
            pad,
            png_trailer: false,
        })
    }

    fn plain(content_type: &'static str, bytes: Vec<u8>) -> Self {
        Self {
            content_type,
            head: bytes.into(),
            pad: 0,
            png_trailer: false,
        }
    }
}

/// Yields the media as chunks of at most 64 KiB of padding at a time.
pub(crate) struct MediaChunks {
    head: Option<Bytes>,
    remaining: u64,
    crc: Option<crc32fast::Hasher>,
    done: bool,
}

impl Iterator for MediaChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if let Some(head) = self.head.take() {
            return Some(head);
        }
        if self.remaining > 0 {
            let n = self.remaining.min(ZEROS.len() as u64) as usize;
            self.remaining -= n as u64;
            if let Some(crc) = self.crc.as_mut() {
                crc.update(&ZEROS[..n]);
            }
            return Some(Bytes::from_static(&ZEROS[..n]));
        }
        if self.done {
            return None;
        }
        self.done = true;
        let crc = self.crc.take()?;
        let mut tail = Vec::with_capacity(PNG_TRAILER_LEN as usize);
        tail.extend_from_slice(&crc.finalize().to_be_bytes());
        tail.extend_from_slice(&PNG_IEND);
        Some(tail.into())
    }
}

/// Standard base64 of an inner byte-chunk iterator, without buffering it all.
pub(crate) struct Base64Chunks<I> {
    inner: I,
    carry: Vec<u8>,
    done: bool,
}

impl<I: Iterator<Item = Bytes>> Iterator for Base64Chunks<I> {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let engine = base64::engine::general_purpose::STANDARD;
        loop {
            if self.done {
                return None;
            }
            match self.inner.next() {
                Some(chunk) => {
                    self.carry.extend_from_slice(&chunk);
                    let whole = self.carry.len() / 3 * 3;
                    if whole == 0 {
                        continue;
                    }
                    let out = engine.encode(&self.carry[..whole]);
                    self.carry.drain(..whole);
                    return Some(out.into());
                }
                None => {
                    self.done = true;
                    if self.carry.is_empty() {
                        return None;
                    }
                    let out = engine.encode(&self.carry);
                    self.carry.clear();
                    return Some(out.into());
                }
            }
        }
    }
}

pub(crate) fn seed_of(text: &str, salt: u64) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    salt.hash(&mut h);
    h.finish()
}

/// RGB PNG whose colours and stripe period derive from `seed`.
pub(crate) fn render_png(width: u32, height: u32, seed: u64) -> Result<Vec<u8>, ApiError> {
    let c1 = [seed as u8, (seed >> 8) as u8, (seed >> 16) as u8];
    let c2 = [(seed >> 24) as u8, (seed >> 32) as u8, (seed >> 40) as u8];
    let period = 4 + (seed >> 48) as u32 % 13;
    let span = (width + height).saturating_sub(2).max(1);
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            let t = (x + y) * 255 / span;
            let dark = ((x / period) + (y / period)).is_multiple_of(2);
            for c in 0..3 {
                let v = (u32::from(c1[c]) * (255 - t) + u32::from(c2[c]) * t) / 255;
                pixels.push(if dark { (v * 3 / 4) as u8 } else { v as u8 });
            }
        }
    }
    let encode = || -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()?;
        Ok(out)
    };
    encode().map_err(|e| ApiError::internal(format!("png encoding failed: {e}")))
}

/// Tone pitch derived from the text, 220–880 Hz.
pub(crate) fn tone_for(text: &str) -> f32 {
    220.0 + (seed_of(text, 7) % 660) as f32
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn collect(m: &Media) -> Vec<u8> {
        m.chunks().flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn padded_png_decodes_and_has_exact_len() {
        let png = render_png(16, 8, 42).unwrap();
        let base = png.len() as u64;
        let m = Media::png(png, base + 200_000).unwrap();
        let bytes = collect(&m);
        assert_eq!(bytes.len() as u64, m.len());
        assert!(bytes.len() as u64 >= base + 200_000);
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).unwrap();
        // Reading to the end validates the padding chunk's CRC too.
        reader.finish().unwrap();
    }

    #[test]
    fn base64_stream_matches_one_shot() {
        let m = Media::wav(123, 440.0, 70_001).unwrap();
        let raw = collect(&m);
        let streamed: Vec<u8> = m.base64_chunks().flat_map(|b| b.to_vec()).collect();
        let expected = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert_eq!(streamed, expected.as_bytes());
        assert_eq!(m.base64_len(), expected.len() as u64);
    }

    #[test]
    fn wav_header_sizes_are_consistent() {
        let m = Media::wav(100, 300.0, 10_001).unwrap();
        let raw = collect(&m);
        assert_eq!(raw.len() as u64, m.len());
        assert!(raw.len() >= 10_001);
        let riff = u32::from_le_bytes(raw[4..8].try_into().unwrap()) as usize;
        let data = u32::from_le_bytes(raw[40..44].try_into().unwrap()) as usize;
        assert_eq!(riff + 8, raw.len());
        assert_eq!(data + 44, raw.len());
    }

    #[test]
    fn wav_tone_is_a_sine_of_the_asked_pitch() {
        // 10 s: the longest speech, where a drifting phasor would show.
        let m = Media::wav(10_000, 440.0, 0).unwrap();
        let raw = collect(&m);
        let pcm: Vec<i16> = raw[44..]
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(pcm.len(), 160_000);
        let fade = 160;
        for (i, &got) in pcm.iter().enumerate().skip(fade).take(pcm.len() - 2 * fade) {
            let t = i as f64 / 16_000.0;
            let want = (t * 440.0 * std::f64::consts::TAU).sin() * 10_000.0;
            assert!(
                (f64::from(got) - want).abs() <= 2.0,
                "sample {i}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn mp4_padding_is_a_free_box() {
        let m = Media::mp4(100_000).unwrap();
        let raw = collect(&m);
        assert_eq!(raw.len() as u64, m.len());
        assert!(raw.len() >= 100_000);
        assert_eq!(&raw[4..8], b"ftyp");
        let off = TINY_MP4.len();
        let size = u32::from_be_bytes(raw[off..off + 4].try_into().unwrap()) as usize;
        assert_eq!(&raw[off + 4..off + 8], b"free");
        assert_eq!(off + size, raw.len());
    }
}
