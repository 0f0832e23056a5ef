"""Converters from public image data sets to the ddmpi HDF5 format (see ``ddmpi.data.schema``).

Run ``python -m data_prep --help`` (or ``ddmpi-prep --help``). Each converter module has one
job: ``mnist`` (IDX files, via ``idx``), ``cifar`` (python pickle batches), ``images`` (image
folders, via Pillow), ``nifti`` (CT/MR volumes, via nibabel), ``digits`` (scikit-learn's bundled
digits). Shared pieces: ``sources`` (class folders, CSV manifests), ``splits`` (seeded, stratified,
grouped splits), ``provenance`` (sha256 of the inputs), ``output`` (writing through
``ddmpi.data.schema.DatasetWriter``), ``download`` (md5-checked downloads). Single files are
loaded by ``ddmpi.data.inputs`` (shared with ``ddmpi predict``); data_prep imports ddmpi, never
the reverse.
"""
