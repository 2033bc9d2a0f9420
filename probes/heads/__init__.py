"""The heads a bundle stores and applies: stored weights -> scores, numpy only (the runtime reads them;
fitting them lives in probes/fitting/)."""
