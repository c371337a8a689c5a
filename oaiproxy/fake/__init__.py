"""
Fakes shipped with the package so that the tests, the benchmarks and
C{--mock-upstream} share them: the fake OpenAI API and the real processes
for end-to-end runs.
"""
