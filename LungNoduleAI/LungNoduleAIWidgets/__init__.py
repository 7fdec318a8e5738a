"""GUI helpers of the LungNoduleAI module panel (Qt through ``slicer.util``): dialogs that install dependencies after asking."""
