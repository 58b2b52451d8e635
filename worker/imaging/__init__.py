"""The image pipeline shared by the worker and by training.

``dicom`` reads and checks DICOM instances, ``pixels`` turns stored pixel values into a
display-ready grey image in [0, 1], ``pipeline`` turns any grey image (DICOM or PNG/JPEG)
into the model's input. Training and the worker both call ``pipeline.model_input``.
"""
