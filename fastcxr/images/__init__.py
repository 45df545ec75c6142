"""Reading images: one layer for every reader of fastcxr — `prepare`, both training loaders
and `predict`.

* `limits` — the one size guard (a declared size bounded before anything is decoded; a shape
  that cannot be a radiograph refused), the same for DICOM and PNG/JPG;
* `readers` — `read_image(path, size, mode)`: the dispatch by suffix to the DICOM reader
  (`fastcxr.dicom`: header checked first, then the pixel data) or the PIL reader, one error
  type per reader, each naming the file;
* `display` — stored values to display pixels (VOI, the MIMIC-CXR-JPG conversion), 16-bit
  greys to 8 bits, and the resize.

Import the modules themselves (`from fastcxr.images.readers import read_image`): this
package's `__init__` imports nothing, so that `fastcxr.dicom` can use `limits` and `display`
while `readers` uses `fastcxr.dicom`.
"""
