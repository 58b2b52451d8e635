"""cxr-screen worker: DICOM in, predictions in SQL out."""
