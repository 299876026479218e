"""pipeline.eval"""
