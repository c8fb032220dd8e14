"""Data for MACL: readers, pre-processing, sampling with positions, views, the demo phantom.

Open `readers.py` first (cases from a folder, MSD or datalist), then `preprocess.py`, `pretrain.py` (batches with
positions) and `views.py` (MACL's augmented views); `segsampling.py` serves fine-tuning.

Typical use::

    from macl.data import open_dataset, load_volumes, PreprocessConfig
    from macl.data import PretrainDataConfig, PretrainDataset, iterate_pretrain_batches
    index = open_dataset("/data/Task02_Heart")          # NIfTI folder, MSD/nnU-Net, or datalist.json
    volumes = load_volumes(index, PreprocessConfig(cache_dir="/tmp/cache"), skip_bad=True)
    ds = PretrainDataset(volumes, PretrainDataConfig(dims=2, patch_size=(64, 64)))
    for batch in iterate_pretrain_batches(ds, batch_size=16, epoch=0):
        ...  # batch["img1"] .. batch["img4"]: (B, 1, 64, 64); batch["positions"]: (B,)

Bad data raises :class:`DataError` naming the file and the problem.
"""
from macl.data.errors import DataError
from macl.data.loading import RawCase, load_case, read_nifti
from macl.data.phantom import CLASS_NAMES as PHANTOM_CLASSES
from macl.data.phantom import PhantomConfig, generate_subject, write_phantom_dataset
from macl.data.preprocess import PreprocessConfig, Volume, VolumeCache, load_volume, load_volumes, preprocess
from macl.data.pretrain import (PretrainDataConfig, PretrainDataset, batches_from_step, batches_per_epoch,
                                iterate_pretrain_batches)
from macl.data.readers import CaseRecord, DatasetIndex, open_dataset, read_datalist, read_msd, read_nifti_folder
from macl.data.sampling import enumerate_slices, extract_slice, patch_position, slice_positions
from macl.data.segsampling import SegBatchSampler, SegSamplingConfig
from macl.data.splits import read_case_list, select_labelled, split_cases
from macl.data.views import IntensityViewConfig, SpatialViewConfig, ViewConfig, make_views

__all__ = [
    "DataError", "RawCase", "load_case", "read_nifti", "PHANTOM_CLASSES", "PhantomConfig", "generate_subject",
    "write_phantom_dataset", "PreprocessConfig", "Volume", "VolumeCache", "load_volume", "load_volumes",
    "preprocess", "PretrainDataConfig", "PretrainDataset", "batches_from_step", "batches_per_epoch",
    "iterate_pretrain_batches", "CaseRecord", "DatasetIndex", "open_dataset", "read_datalist", "read_msd",
    "read_nifti_folder", "enumerate_slices", "extract_slice", "patch_position", "slice_positions",
    "SegBatchSampler", "SegSamplingConfig", "read_case_list", "select_labelled", "split_cases",
    "IntensityViewConfig", "SpatialViewConfig", "ViewConfig", "make_views",
]
