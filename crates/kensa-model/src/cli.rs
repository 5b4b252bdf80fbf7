//! Command-line options shared by every command that loads a model or builds a bank (`enroll`,
//! `score`, `eval`, `train-judge`), so each flag means the same everywhere.

use crate::backbone::Backbone;
use crate::engine::Engine;
use crate::enroll::EnrollOptions;
use crate::{ModelError, Result};
use kensa_core::config::{Device, Precision};
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// TorchScript backbone (default: $KENSA_BACKBONE, else the one scripts/setup.sh exports).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Where the model runs: auto (CUDA when present), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = one_of::<Device>(&["auto", "cpu", "cuda"]))]
    pub device: Device,
    /// libtorch threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Arithmetic: auto (the backbone file's dtype), fp32, fp16 or bf16.
    #[arg(long, default_value = "auto", value_parser = one_of::<Precision>(&["auto", "fp32", "fp16", "bf16"]))]
    pub precision: Precision,
}

/// A clap parser that lists `values` in `--help` and in errors, and parses them with `FromStr`.
fn one_of<T>(values: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Display,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(values).try_map(|s| s.parse::<T>().map_err(|e| e.to_string()))
}

impl ModelArgs {
    /// The backbone these options name, loaded (with the precision warning).
    pub fn backbone(&self) -> Result<Backbone> {
        if self.threads > 0 {
            tch::set_num_threads(i32::try_from(self.threads).unwrap_or(i32::MAX));
        }
        crate::load_backbone(self.backbone.as_deref(), self.device, self.precision)
    }
}

/// How a bank is built: recorded in it, and used by everything that scores against it.
#[derive(clap::Args, Clone, Debug)]
pub struct RecipeArgs {
    /// Model input side in pixels (recorded in the bank; scoring uses the bank's own).
    #[arg(long, default_value_t = crate::DEFAULT_INPUT_SIZE)]
    pub input_size: u32,
    /// Neighbourhood averaged into each patch feature, one odd size per backbone layer, comma
    /// separated (default: 1 for the finest layer, 3 for the others).
    #[arg(long, value_delimiter = ',')]
    pub aggregation: Option<Vec<u32>>,
    /// Transformed copies of each reference added to the bank: `none`, or a comma list of
    /// hflip, vflip, rot90, rot180, rot270, rotate:DEGREES, shift:FRACTION. Use `none` (or flips
    /// only) for parts whose orientation matters.
    #[arg(long, default_value = crate::augment::DEFAULT)]
    pub augment: String,
    /// Keep this fraction of each reference's patches (greedy k-center coreset, 0 < f ≤ 1):
    /// smaller, faster banks for many references. 1 keeps all.
    #[arg(long, default_value_t = 1.0)]
    pub coreset: f64,
    /// Score only this region of each frame: X,Y,WIDTH,HEIGHT in frame pixels (clipped to the
    /// frame; the map is 0 outside). Recorded in the bank, applied to the references too.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub crop: Option<Vec<u32>>,
    /// Score with the bank alone: no self-match (by default the coarser layer also lets a
    /// frame's own distant, well-explained patches vouch for its patches; docs/evaluation.md).
    #[arg(long)]
    pub no_self_match: bool,
}

impl RecipeArgs {
    /// An engine that extracts features as this recipe says.
    pub fn engine(&self, backbone: Backbone) -> Result<Engine> {
        let engine = Engine::new(backbone, self.input_size).with_self_match(!self.no_self_match);
        match &self.aggregation {
            Some(a) => engine.with_aggregation(a.clone()),
            None => Ok(engine),
        }
    }

    /// The enrollment options of this recipe for `product`.
    pub fn options(&self, product: &str, seed: u64) -> Result<EnrollOptions> {
        let augment = crate::augment::parse_list(&self.augment)?;
        let crop = match self.crop.as_deref() {
            None => None,
            Some(&[x, y, w, h]) if w > 0 && h > 0 => Some([x, y, w, h]),
            Some(other) => {
                return Err(ModelError::Recipe(format!(
                    "--crop {other:?}: give X,Y,WIDTH,HEIGHT with a non-zero width and height"
                )))
            }
        };
        Ok(EnrollOptions { coreset: self.coreset, augment, crop, ..EnrollOptions::new(product, seed) })
    }
}
