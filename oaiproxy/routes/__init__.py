"""
What each OpenAI endpoint means: the route table, the JSON routes, models,
uploads, and the checks a body must pass.
"""
