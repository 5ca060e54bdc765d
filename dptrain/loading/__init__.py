"""Stage 2, loading: a subset -> uint8 batches on the device. `loader` (the Loader, its feeder
thread and the PixelSource seam), `decode` (the JPEGs decoded by DALI), `transforms` (the train
and eval transforms, on either device), `pixelcache` (a run's subset decoded once, in GPU or
host memory) and `evalcache` (eval images decoded once, on disk)."""
