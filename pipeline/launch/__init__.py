"""pipeline.launch"""
