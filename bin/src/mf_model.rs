//! A matrix-factorisation model directory opened for reading (`predict`, `recommend`): the
//! manifest's `mf` section and the tensors file, read by ranges (the factors, one user's row,
//! one user's rated items) rather than whole.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tidepool_actors::jobs::model_dir::{
    Manifest, MfManifest, MF_ITEM_FACTORS, MF_KIND, MF_RATED_ITEMS, MF_RATED_OFFSETS,
    MF_USER_FACTORS, TENSORS,
};

use crate::safetensors_file::{self as stf, Layout};

/// An open `mf` model directory.
#[derive(Debug)]
pub struct MfModel {
    /// The manifest.
    pub manifest: Manifest,
    /// Its `mf` section.
    pub mf: MfManifest,
    file: File,
    layout: Layout,
    /// The directory and its tensors file.
    dir: PathBuf,
    path: PathBuf,
}

impl MfModel {
    /// Opens model directory `dir`, checking that it is an `mf` model whose tensors have the
    /// dtypes and shapes its manifest says.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = crate::model_dir::read_manifest(dir)?;
        ensure!(
            manifest.kind == MF_KIND,
            "{}: a {:?} model, not matrix factorisation ({MF_KIND:?})",
            dir.display(),
            manifest.kind
        );
        let mf = manifest
            .mf
            .clone()
            .with_context(|| format!("{}: the manifest has no mf section", dir.display()))?;
        let path = dir.join(TENSORS);
        let mut file =
            File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let layout = stf::read_layout(&mut file)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let k = mf.rank as u64;
        for (name, dtype, shape) in [
            (MF_USER_FACTORS, "F32", vec![mf.users, k]),
            (MF_ITEM_FACTORS, "F32", vec![mf.items, k]),
            (MF_RATED_OFFSETS, "I64", vec![mf.users + 1]),
            (MF_RATED_ITEMS, "I32", vec![mf.pairs]),
        ] {
            let t = layout
                .tensor(name)
                .with_context(|| format!("{}", path.display()))?;
            ensure!(
                t.dtype == dtype && t.shape == shape,
                "{}: tensor {name} is {} {:?}, the manifest says {dtype} {shape:?}",
                path.display(),
                t.dtype,
                t.shape
            );
        }
        Ok(MfModel {
            manifest,
            mf,
            file,
            layout,
            dir: dir.to_path_buf(),
            path,
        })
    }

    fn read(&mut self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        stf::read_range(&mut self.file, &self.layout, name, offset, len)
            .with_context(|| format!("{}", self.path.display()))
    }

    fn whole(&mut self, name: &str) -> Result<Vec<f32>> {
        let t = self.layout.tensor(name)?;
        let len = t.end - t.begin;
        Ok(stf::f32s(&self.read(name, 0, len)?))
    }

    /// Every user's embedding, row-major (`users x rank`).
    pub fn user_factors(&mut self) -> Result<Vec<f32>> {
        self.whole(MF_USER_FACTORS)
    }

    /// Every item's embedding, row-major (`items x rank`).
    pub fn item_factors(&mut self) -> Result<Vec<f32>> {
        self.whole(MF_ITEM_FACTORS)
    }

    fn check_user(&self, user: u64) -> Result<()> {
        if user >= self.mf.users {
            return Err(crate::exit::CliError::NotFound(format!(
                "user {user} is not in the model {} (it has users 0..{})",
                self.dir.display(),
                self.mf.users
            ))
            .into());
        }
        Ok(())
    }

    /// User `user`'s embedding; a user beyond the model is a not-found error.
    pub fn user_row(&mut self, user: u64) -> Result<Vec<f32>> {
        self.check_user(user)?;
        let row = self.mf.rank as u64 * 4;
        Ok(stf::f32s(&self.read(MF_USER_FACTORS, user * row, row)?))
    }

    /// The items user `user` rated in training, increasing; checked against the model's items.
    pub fn rated(&mut self, user: u64) -> Result<Vec<u32>> {
        self.check_user(user)?;
        let ends = stf::i64s(&self.read(MF_RATED_OFFSETS, user * 8, 16)?);
        let (begin, end) = match ends[..] {
            [b, e] if 0 <= b && b <= e && e as u64 <= self.mf.pairs => (b as u64, e as u64),
            _ => bail!(
                "{}: rated_offsets[{user}..{}] = {ends:?} is not a range of rated_items",
                self.path.display(),
                user + 2
            ),
        };
        let items = stf::i32s(&self.read(MF_RATED_ITEMS, begin * 4, (end - begin) * 4)?);
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            let ok = i >= 0
                && (i as u64) < self.mf.items
                && out.last().is_none_or(|&l: &u32| l < i as u32);
            ensure!(
                ok,
                "{}: rated_items of user {user} are not increasing item ids below {} (at {i})",
                self.path.display(),
                self.mf.items
            );
            out.push(i as u32);
        }
        Ok(out)
    }
}
