"""A seeded, template-built assistant corpus whose objectives genuinely conflict.

Every response is assembled from sentence pools of one topic: on-topic facts (relevant, neutral, long),
cautionary facts (relevant but negative), short answers (brief, weakly relevant), curt gloomy remarks (the
briefest, negative), cheerful filler and off-topic chatter (positive but irrelevant and long). A response
*style* picks how many of each, so the best response for positivity (VADER) is not the best for relevance
or brevity, and every pair of objectives conflicts: the most positive answers are long, the briefest are
negative or neutral. A tiny LM can still learn the whole language (about a thousand words) in minutes on a
CPU.

Responses are stored without a leading space; training text is `prompt + " " + response`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PROMPT_TEMPLATE = "\n\nHuman: {question}\n\nAssistant:"
MAX_WORDS = 60


@dataclass(frozen=True)
class Topic:
    """One subject area: its subjects, question templates and sentence pools.

    `{s}` is the subject; `{my}` inside a subject reads "my" in questions and "your" in answers. Facts, quick
    answers and cautions name the subject (relevant), tips and shorts do not (vaguer), chatter is positive small talk
    that other topics' answers drift into (irrelevant).
    """

    name: str
    subjects: tuple[str, ...]
    questions: tuple[str, ...]
    facts: tuple[str, ...]
    tips: tuple[str, ...]
    cautions: tuple[str, ...]
    shorts: tuple[str, ...]
    quick: tuple[str, ...]
    chatter: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        name="cooking",
        subjects=("pasta", "rice", "soup", "chicken", "eggs", "vegetables", "pancakes", "fish", "beans", "curry"),
        questions=(
            "How do I cook {s} properly?",
            "What is the best way to prepare {s} for dinner?",
            "Why does my {s} always turn out bland?",
            "How long should I cook {s}?",
            "Can you give me tips for making {s}?",
            "How can I make {s} taste better?",
            "What should I know before cooking {s} for guests?",
        ),
        facts=(
            "Cook the {s} over medium heat and stir every few minutes.",
            "Season the {s} with salt and pepper near the end.",
            "A little garlic and olive oil gives the {s} more flavor.",
            "Taste the {s} as you go and adjust the seasoning.",
            "Let the {s} rest for a few minutes before serving.",
            "Use a heavy pan so the {s} heats evenly.",
            "Prepare all the ingredients before you start cooking the {s}.",
            "Lemon juice or fresh herbs can lift the {s}.",
            "Keep leftover {s} in a sealed container in the fridge.",
            "Most recipes for {s} need a pinch of salt and some patience.",
        ),
        tips=(
            "Use a heavy pan and medium heat.",
            "Read the whole recipe before you start.",
            "Cut everything into pieces of the same size.",
            "A kitchen timer keeps the cooking time right.",
            "Clean as you go so the counter stays clear.",
            "Salt the water well before it boils.",
        ),
        cautions=(
            "Be careful, undercooked {s} can make people sick.",
            "If you leave the {s} too long, it gets burnt and bitter.",
            "Too much salt can ruin the {s} completely.",
            "Old {s} that smells bad should go straight in the trash.",
            "Hot oil can spill and cause painful burns.",
            "Never leave a hot stove alone, because kitchen fires are dangerous.",
            "A dull knife is risky and often causes nasty cuts.",
        ),
        shorts=(
            "Use medium heat.",
            "Stir often.",
            "Taste as you go.",
            "Follow a simple recipe.",
            "Add some salt.",
            "Go slowly.",
        ),
        quick=(
            "Cook the {s} slowly.",
            "Season the {s} well.",
            "Stir the {s} often.",
            "Taste the {s} as you go.",
            "Salt the {s} at the end.",
        ),
        chatter=(
            "I love the smell of fresh bread in the morning.",
            "Cooking with friends is one of my favorite things.",
        ),
    ),
    Topic(
        name="travel",
        subjects=("Japan", "Italy", "Mexico", "Paris", "the mountains", "the beach", "Spain", "London", "Canada"),
        questions=(
            "How should I plan a trip to {s}?",
            "What should I pack for a trip to {s}?",
            "Is it expensive to travel to {s}?",
            "When is the best time to visit {s}?",
            "What do I need to know before going to {s}?",
            "How can I save money on a trip to {s}?",
            "Can you help me plan a week in {s}?",
        ),
        facts=(
            "Book your flights and rooms for {s} a few months early.",
            "Check the weather for {s} before you pack.",
            "Pack light clothes and comfortable walking shoes for {s}.",
            "Local buses and trains are a cheap way to get around {s}.",
            "Learn a few local words before you visit {s}.",
            "Spring and autumn are often quiet seasons in {s}.",
            "Make a simple plan for each day of the trip to {s}.",
            "Read a travel guide about {s} to find the main sights.",
            "Prices in {s} are lower outside the school holidays.",
        ),
        tips=(
            "Keep a copy of your passport and tickets in your bag.",
            "Travel insurance covers lost bags and medical costs.",
            "Carry some local cash for small shops and markets.",
            "A day of rest in the middle of the trip keeps you fresh.",
            "Pack a small first aid kit and a phone charger.",
        ),
        cautions=(
            "Flights to {s} can get very expensive in the summer.",
            "Some tourist areas in {s} are full of scams and bad deals.",
            "Pickpockets are a real problem in crowded places.",
            "Losing your passport abroad is a stressful and costly mistake.",
            "Delays and missed trains can ruin a tight plan.",
            "Drinking unsafe water can make travelers sick for days.",
            "Hotels near the airport are often noisy and terrible.",
        ),
        shorts=(
            "Book early.",
            "Pack light.",
            "Check the weather.",
            "Bring your passport.",
            "Plan each day.",
            "Take the train.",
        ),
        quick=(
            "Book the trip to {s} early.",
            "Pack light for {s}.",
            "Visit {s} in spring.",
            "Plan each day in {s}.",
            "Read a guide to {s}.",
        ),
        chatter=("I love watching the sunset from a quiet beach.", "Travel always makes me feel happy and free."),
    ),
    Topic(
        name="gardening",
        subjects=(
            "tomatoes",
            "roses",
            "herbs",
            "peppers",
            "houseplants",
            "strawberries",
            "potatoes",
            "sunflowers",
            "lettuce",
        ),
        questions=(
            "How do I grow {s}?",
            "How often should I water {s}?",
            "Why are my {s} dying?",
            "What soil is best for {s}?",
            "When should I plant {s}?",
            "How do I keep {s} healthy?",
            "Can you give me tips for taking care of {s}?",
        ),
        facts=(
            "Water the {s} deeply in the early morning.",
            "Most {s} need about six hours of sun each day.",
            "Mix compost into the soil before you plant the {s}.",
            "Plant the {s} after the last frost of spring.",
            "A layer of mulch keeps the soil around the {s} moist.",
            "Check the leaves of the {s} every week.",
            "Feed the {s} with a gentle fertilizer once a month.",
            "Pull small weeds near the {s} by hand.",
            "A soil test tells you what the {s} are missing.",
        ),
        tips=(
            "Loose soil that drains well helps the roots.",
            "Water at the base of the plant, not on the leaves.",
            "Give plants enough space so air can move around them.",
            "Trim old leaves to make room for new growth.",
            "A rain barrel saves water in dry months.",
        ),
        cautions=(
            "Too much water will rot the roots of the {s}.",
            "Pests and snails can destroy young {s} overnight.",
            "A late frost can kill the {s} in a single night.",
            "Poor soil leaves the {s} small, pale and sick.",
            "Hot afternoon sun can dry out and damage the {s}.",
            "Fungus spreads fast and ruins weak plants.",
            "Strong chemicals can harm bees and damage the garden.",
        ),
        shorts=(
            "Water daily.",
            "Give them sun.",
            "Use good soil.",
            "Plant in spring.",
            "Add some compost.",
            "Check the leaves.",
        ),
        quick=(
            "Water the {s} deeply.",
            "Give the {s} sun.",
            "Feed the {s} monthly.",
            "Mulch around the {s}.",
            "Plant the {s} in spring.",
        ),
        chatter=("I love the bright colors of a summer garden.", "Fresh flowers always make my day better."),
    ),
    Topic(
        name="computers",
        subjects=(
            "{my} laptop",
            "{my} computer",
            "Windows",
            "{my} printer",
            "the wifi",
            "{my} keyboard",
            "Linux",
            "{my} hard drive",
        ),
        questions=(
            "Why is {s} so slow?",
            "How do I fix {s}?",
            "What should I do when {s} stops working?",
            "How can I speed up {s}?",
            "How do I keep {s} secure?",
            "Can you help me set up {s}?",
            "What is the easiest way to clean up {s}?",
        ),
        facts=(
            "Restart {s} and install the latest updates.",
            "Close programs you are not using so {s} has more memory.",
            "Check the cables and the power supply of {s}.",
            "Remove old files and apps to free up space on {s}.",
            "Run a virus scan on {s} once a week.",
            "Look up the error message from {s} online.",
            "Update the drivers for {s} from the official website.",
            "Turn {s} off and on again before you try anything else.",
            "The manual for {s} lists the common fixes.",
        ),
        tips=(
            "Use a strong password and turn on two step login.",
            "Back up your files to an external drive or the cloud.",
            "A new solid state drive can make an old computer faster.",
            "The task manager shows which program uses the most memory.",
            "Write down each step so you can undo it later.",
        ),
        cautions=(
            "An old battery can overheat and damage {s}.",
            "Deleting system files by mistake can ruin {s}.",
            "A virus can steal your passwords and your data.",
            "If the hard drive fails, you can lose every file you have.",
            "Fake support calls are a common scam that costs people money.",
            "Opening strange email attachments is dangerous.",
            "Cheap cables often break and cause annoying problems.",
        ),
        shorts=(
            "Restart it first.",
            "Install the updates.",
            "Check the cables.",
            "Free up some space.",
            "Run a virus scan.",
            "Back up your files.",
        ),
        quick=(
            "Restart {s} now.",
            "Update {s} today.",
            "Clean up {s} weekly.",
            "Scan {s} for viruses.",
            "Back up {s} first.",
        ),
        chatter=(
            "I love playing simple games on a rainy evening.",
            "Learning something new on the computer is so much fun.",
        ),
    ),
    Topic(
        name="health",
        subjects=("a cold", "back pain", "headaches", "a sore throat", "allergies", "high blood pressure", "a fever"),
        questions=(
            "What can I do about {s}?",
            "How do I get rid of {s}?",
            "What helps with {s}?",
            "When should I see a doctor about {s}?",
            "How can I prevent {s}?",
            "Is {s} something to worry about?",
            "What are some home remedies for {s}?",
        ),
        facts=(
            "Rest and drink plenty of water when you have {s}.",
            "A doctor can tell you what is causing {s}.",
            "Regular sleep helps the body recover from {s}.",
            "Light stretching and walking can ease {s}.",
            "Keep a simple diary of when {s} starts and stops.",
            "A pharmacist can suggest medicine for {s}.",
            "Most cases of {s} get better within a week or two.",
            "Cut down on salt and caffeine if you have {s}.",
        ),
        tips=(
            "Wash your hands often to stop germs from spreading.",
            "Warm tea with honey soothes the throat.",
            "Eat fruit and vegetables to support your immune system.",
            "Take medicine exactly as the label says.",
            "A short walk every day keeps the body moving.",
        ),
        cautions=(
            "Ignoring {s} for too long can lead to serious problems.",
            "Stress and poor sleep can make {s} much worse.",
            "Taking too many pills can hurt your liver.",
            "A very high fever is dangerous and needs a doctor.",
            "Sharp chest pain is an emergency, so call for help at once.",
            "Bad posture makes pain worse over time.",
            "Some home remedies are useless or even harmful.",
        ),
        shorts=(
            "Rest and drink water.",
            "See a doctor.",
            "Sleep more.",
            "Wash your hands.",
            "Try some warm tea.",
            "Ask a pharmacist.",
        ),
        quick=(
            "Rest well with {s}.",
            "Drink water for {s}.",
            "See a doctor about {s}.",
            "Treat {s} early.",
            "Track {s} daily.",
        ),
        chatter=("I love a long walk in the fresh air.", "A good night of sleep makes me so happy."),
    ),
    Topic(
        name="money",
        subjects=("a budget", "{my} savings", "credit card debt", "retirement", "investing", "{my} rent", "a car loan"),
        questions=(
            "How do I start with {s}?",
            "What is the best advice about {s}?",
            "How can I manage {s} better?",
            "What should I know about {s}?",
            "How do I make a plan for {s}?",
            "Is {s} worth thinking about when I am young?",
            "Can you explain {s} in simple terms?",
        ),
        facts=(
            "Set a clear goal for {s} and check it every month.",
            "Read the terms of {s} carefully before you sign.",
            "A simple spreadsheet is enough to track {s}.",
            "Talk to a bank advisor about {s}.",
            "Write a one page plan for {s}.",
            "Many free apps can help you keep an eye on {s}.",
            "Learn the basic words used for {s} before you decide.",
            "Review {s} whenever your income changes.",
        ),
        tips=(
            "Write down your income and every expense each month.",
            "Pay the bills with the highest interest first.",
            "Put a small part of every paycheck into savings.",
            "An emergency fund should cover three to six months of costs.",
            "Index funds are a simple and cheap way to invest.",
            "Automatic transfers make saving easier.",
            "Cancel subscriptions you no longer use.",
        ),
        cautions=(
            "Without a plan, {s} can become a serious problem.",
            "Hidden fees in {s} slowly waste your money.",
            "Credit card interest can trap you in debt for years.",
            "Late payments hurt your credit score.",
            "Many investment tips online are scams that lose people money.",
            "Borrowing money for luxuries is a costly mistake.",
            "Panic selling in a crash locks in painful losses.",
        ),
        shorts=(
            "Make a budget.",
            "Save a little each month.",
            "Pay off debt first.",
            "Track your spending.",
            "Start early.",
            "Compare prices.",
        ),
        quick=(
            "Track {s} monthly.",
            "Review {s} often.",
            "Plan for {s} now.",
            "Ask a bank about {s}.",
            "Keep {s} simple.",
        ),
        chatter=("I love finding a great deal at the market.", "Treating a friend to lunch makes me feel wonderful."),
    ),
    Topic(
        name="pets",
        subjects=(
            "{my} dog",
            "{my} cat",
            "a puppy",
            "a kitten",
            "{my} rabbit",
            "{my} parrot",
            "{my} hamster",
            "a goldfish",
        ),
        questions=(
            "How do I take care of {s}?",
            "What should I feed {s}?",
            "How do I train {s}?",
            "Why is {s} acting strange?",
            "How often should {s} see a vet?",
            "How can I keep {s} happy and healthy?",
            "What do I need before I bring home {s}?",
        ),
        facts=(
            "Feed {s} at the same times every day.",
            "Fresh water should always be available for {s}.",
            "Take {s} to the vet once a year for a checkup.",
            "Short training sessions with small treats work well for {s}.",
            "Give {s} toys and time to play every day.",
            "A quiet corner with a soft bed helps {s} relax.",
            "Ask the vet which food is right for {s}.",
            "A regular routine makes {s} feel safe.",
            "Check the teeth and ears of {s} every month.",
        ),
        tips=(
            "Brush the coat regularly to keep it clean.",
            "Keep the cage or bed clean and dry.",
            "Animals need time to learn new rules.",
            "A vet can answer questions about food and health.",
            "Put away cables and small objects around the house.",
        ),
        cautions=(
            "Chocolate and grapes are toxic and can kill {s}.",
            "Yelling at {s} causes fear and bad behavior.",
            "An untreated infection can make {s} very sick.",
            "Small toys can choke {s}.",
            "Overfeeding leads to obesity and joint pain.",
            "Leaving a pet alone for days is cruel and dangerous.",
            "Fleas and ticks spread disease quickly.",
        ),
        shorts=(
            "Feed on time.",
            "Visit the vet.",
            "Play every day.",
            "Use small treats.",
            "Give fresh water.",
            "Be patient.",
        ),
        quick=(
            "Feed {s} on time.",
            "Play with {s} daily.",
            "Take {s} to the vet.",
            "Train {s} gently.",
            "Give {s} fresh water.",
        ),
        chatter=("I love watching puppies play in the park.", "A purring cat is the sweetest sound in the world."),
    ),
    Topic(
        name="fitness",
        subjects=("running", "lifting weights", "yoga", "swimming", "losing weight", "building muscle", "cycling"),
        questions=(
            "How do I get started with {s}?",
            "How many days a week should I spend on {s}?",
            "What is a good plan for {s}?",
            "How can I get better at {s}?",
            "What mistakes do beginners make with {s}?",
            "Is {s} good for my health?",
            "How do I stay motivated with {s}?",
        ),
        facts=(
            "Start {s} slowly with three short sessions a week.",
            "Warm up for ten minutes before {s}.",
            "Add a little more time or weight to {s} each week.",
            "Drink water before, during and after {s}.",
            "Keep a log of every session of {s}.",
            "Rest days are part of any plan for {s}.",
            "A coach can check your form for {s}.",
            "Mix {s} with some stretching and light cardio.",
            "Set a small goal for {s} each month.",
        ),
        tips=(
            "Protein and sleep help your muscles recover.",
            "Training with a friend makes it easier to keep going.",
            "Simple shoes and clothes are enough to begin.",
            "Stretch gently after every workout.",
            "Small steady steps beat big sudden changes.",
        ),
        cautions=(
            "Bad form when {s} can hurt your back and knees.",
            "Doing too much {s} too soon often leads to injury.",
            "Skipping rest days leaves you tired and sore.",
            "Crash diets are unhealthy and usually fail.",
            "Pain that does not go away is a warning sign.",
            "Training in extreme heat is dangerous.",
            "Comparing yourself to others can make you feel bad.",
        ),
        shorts=(
            "Start slowly.",
            "Warm up first.",
            "Rest between sessions.",
            "Drink water.",
            "Keep a log.",
            "Set small goals.",
        ),
        quick=(
            "Start {s} slowly.",
            "Warm up before {s}.",
            "Rest after {s}.",
            "Keep {s} regular.",
            "Track your {s} sessions.",
        ),
        chatter=("I love the feeling after a long morning run.", "Dancing in the kitchen is my favorite exercise."),
    ),
    Topic(
        name="music",
        subjects=("the guitar", "the piano", "singing", "the drums", "the violin", "music theory", "writing songs"),
        questions=(
            "How do I learn {s}?",
            "How long does it take to get good at {s}?",
            "What is the best way to practice {s}?",
            "Am I too old to start {s}?",
            "How can I improve at {s} quickly?",
            "What do I need to begin {s}?",
            "Can you give me a practice plan for {s}?",
        ),
        facts=(
            "Practice {s} for twenty minutes every day.",
            "A teacher can correct your technique in {s} early.",
            "Start {s} with simple songs you already know.",
            "Online lessons for {s} are cheap and flexible.",
            "Most adults can learn {s} with regular practice.",
            "Record your practice of {s} and listen back.",
            "Break a hard part of {s} into small pieces and repeat them.",
            "Learn the basic scales for {s} before the hard songs.",
        ),
        tips=(
            "Use a metronome to keep a steady beat.",
            "Listen to many styles of music to train your ear.",
            "Warm up your hands or voice before you play.",
            "Playing with other people teaches timing and listening.",
            "Short daily practice beats one long weekly session.",
        ),
        cautions=(
            "Bad habits in {s} are hard to unlearn later.",
            "Many beginners quit {s} because progress feels slow.",
            "Skipping the basics of {s} causes problems later.",
            "Practicing too long can hurt your hands or voice.",
            "A cheap instrument can sound terrible and be hard to play.",
            "Loud music can damage your hearing over time.",
            "Stage fright can be painful and stressful.",
        ),
        shorts=(
            "Practice daily.",
            "Use a metronome.",
            "Start with easy songs.",
            "Find a teacher.",
            "Learn the scales.",
            "Record yourself.",
        ),
        quick=(
            "Practice {s} daily.",
            "Learn {s} slowly.",
            "Take lessons in {s}.",
            "Warm up before {s}.",
            "Keep at {s} every day.",
        ),
        chatter=("I love singing along to old songs in the car.", "Music always puts a big smile on my face."),
    ),
    Topic(
        name="cars",
        subjects=("{my} car", "the brakes", "the engine", "{my} tires", "the battery", "an electric car", "a used car"),
        questions=(
            "How do I take care of {s}?",
            "What should I check on {s}?",
            "Why is {s} making a strange noise?",
            "How often should I service {s}?",
            "What should I know before buying {s}?",
            "How can I make {s} last longer?",
            "Is it hard to maintain {s}?",
        ),
        facts=(
            "Service {s} about once a year or every ten thousand miles.",
            "A mechanic can inspect {s} for a small fee.",
            "Read the manual to learn the service plan for {s}.",
            "Keep {s} clean, especially in winter.",
            "Drive smoothly to save fuel and protect {s}.",
            "Compare a few quotes before paying for repairs on {s}.",
            "Ask for the service history of {s}.",
            "Listen for new sounds from {s} and note when they happen.",
        ),
        tips=(
            "Check the oil and the tire pressure every month.",
            "Rotate the tires so they wear evenly.",
            "Test the battery before the cold season.",
            "Replace the wiper blades and filters on schedule.",
            "Keep a small emergency kit in the trunk.",
        ),
        cautions=(
            "Ignoring a warning light can destroy {s}.",
            "Some dealers hide serious problems with {s}.",
            "Rust slowly eats away at {s}.",
            "Worn brakes are dangerous and can cause a crash.",
            "Bald tires slide badly on wet roads.",
            "A dead battery can leave you stuck in the cold.",
            "Cheap parts often fail and cost more later.",
        ),
        shorts=(
            "Check the oil.",
            "See a mechanic.",
            "Service it yearly.",
            "Check the tire pressure.",
            "Read the manual.",
            "Drive smoothly.",
        ),
        quick=(
            "Service {s} yearly.",
            "Check {s} monthly.",
            "Inspect {s} often.",
            "Clean {s} in winter.",
            "Ask a mechanic about {s}.",
        ),
        chatter=(
            "I love long drives with the windows down in summer.",
            "Washing the car on a sunny day is so relaxing.",
        ),
    ),
    Topic(
        name="home",
        subjects=(
            "the floors",
            "{my} kitchen",
            "the bathroom",
            "a small apartment",
            "{my} garage",
            "the walls",
            "the windows",
        ),
        questions=(
            "How do I fix {s}?",
            "How can I clean {s} quickly?",
            "What is the best way to organize {s}?",
            "How do I paint {s}?",
            "How can I make {s} feel bigger?",
            "What tools do I need for {s}?",
            "Can you give me tips for {s}?",
        ),
        facts=(
            "Turn off the water before you work on {s}.",
            "A basic tool kit covers most small jobs around {s}.",
            "Clean {s} from top to bottom so dust falls on dirty areas.",
            "Sort things in {s} into keep, donate and throw away.",
            "Light colors and mirrors make {s} look bigger.",
            "Measure twice before you buy anything for {s}.",
            "Shelves and hooks free up floor space in {s}.",
            "Watch a short video before you repair {s}.",
            "Work on one small area of {s} at a time.",
        ),
        tips=(
            "Use painter's tape and a primer for clean edges.",
            "Open the windows to let fresh air in while you work.",
            "Replace the worn washer to stop most drips.",
            "Keep a small box of screws, tape and glue at hand.",
            "Label boxes so you can find things later.",
        ),
        cautions=(
            "Water damage from {s} can cause mold and rot.",
            "Cheap paint peels and looks terrible on {s}.",
            "Clutter in {s} makes stress and anxiety worse.",
            "Mixing cleaning products can release toxic gas.",
            "Electrical work is dangerous without the right training.",
            "A fall from a ladder can cause a serious injury.",
            "A small leak can waste a lot of water and money.",
        ),
        shorts=(
            "Turn off the water.",
            "Clean top down.",
            "Use light colors.",
            "Measure first.",
            "Get a tool kit.",
            "Clear the clutter.",
        ),
        quick=(
            "Clean {s} top down.",
            "Measure {s} first.",
            "Work on {s} slowly.",
            "Plan {s} carefully.",
            "Clear out {s} first.",
        ),
        chatter=(
            "I love a cozy room with warm lights and soft pillows.",
            "Fresh flowers on the table make any home cheerful.",
        ),
    ),
    Topic(
        name="study",
        subjects=("math", "history", "a new language", "chemistry", "exams", "writing essays", "coding", "biology"),
        questions=(
            "How do I study {s}?",
            "What is the best way to learn {s}?",
            "How can I get better grades in {s}?",
            "How do I stay focused when studying {s}?",
            "Why do I find {s} so hard?",
            "How much time should I spend on {s}?",
            "Can you give me a plan for {s}?",
        ),
        facts=(
            "Study {s} in short sessions with breaks in between.",
            "Test yourself on {s} instead of just reading notes.",
            "Explain {s} out loud as if you were teaching a friend.",
            "Make a weekly plan with time for {s} each day.",
            "Flash cards help you remember key facts about {s}.",
            "Work through old problems and past papers on {s}.",
            "Ask your teacher about the parts of {s} you do not understand.",
            "Review your notes on {s} the same day you write them.",
            "Start with the basics of {s} and build up slowly.",
        ),
        tips=(
            "Put your phone in another room while you study.",
            "Study groups let you compare answers and ideas.",
            "Sleep helps your brain store what you learned.",
            "A quiet desk with good light helps you focus.",
            "Write short summaries in your own words.",
        ),
        cautions=(
            "Stress and lack of sleep make it hard to learn {s}.",
            "Many students fail {s} because they fall behind early.",
            "Skipping classes makes {s} much harder later.",
            "Cramming the night before usually leads to poor results.",
            "Copying answers teaches you nothing and can get you in trouble.",
            "Long sessions without breaks leave you tired and confused.",
            "Social media is a terrible distraction while studying.",
        ),
        shorts=(
            "Study daily.",
            "Use flash cards.",
            "Test yourself.",
            "Take short breaks.",
            "Ask your teacher.",
            "Make a plan.",
        ),
        quick=(
            "Study {s} daily.",
            "Review {s} often.",
            "Practice {s} every day.",
            "Test yourself on {s}.",
            "Plan time for {s}.",
        ),
        chatter=("I love reading a good book on a quiet afternoon.", "Learning new things makes every day exciting."),
    ),
)

# Situations the asker mentions before the question: (what the asker says, a plain answer to it, a gloomy
# one that restates it). Answers that address more of them cover more of the prompt, so they are more relevant and longer.
CONTEXTS = (
    (
        "I live somewhere cold and rainy.",
        "In cold, rainy weather, plan around the rain.",
        "Living somewhere cold and rainy, bad weather can ruin everything.",
    ),
    (
        "My budget is tight.",
        "On a tight budget, pick cheap options first.",
        "With a budget this tight, one costly mistake hurts.",
    ),
    (
        "I have little spare time.",
        "With little spare time, keep a short routine.",
        "Having so little spare time, you may burn out and fail.",
    ),
    (
        "I have two small kids.",
        "With small kids, keep things simple and out of reach.",
        "Having two small kids, accidents are a real danger.",
    ),
    (
        "I am a complete beginner.",
        "As a beginner, learn the basics first.",
        "As a complete beginner, you will make painful mistakes.",
    ),
    (
        "I live in a small city flat.",
        "In a small flat, use every bit of space.",
        "Living in a small city flat, clutter is a constant problem.",
    ),
    (
        "I am over sixty.",
        "At over sixty, keep a slow and steady pace.",
        "Being over sixty, an injury can be serious and painful.",
    ),
    (
        "I live alone.",
        "Living alone, keep a checklist and ask a neighbor.",
        "Living alone, problems can get worse unnoticed.",
    ),
    (
        "I tried once and it did not work.",
        "Since the last try did not work, change one thing at a time.",
        "You tried once and it did not work, so the same mistakes may return.",
    ),
    (
        "I need results in two weeks.",
        "Within two weeks, focus on the one key step.",
        "Needing results in two weeks, you may rush and get bad results.",
    ),
)
CONTEXTS_PER_PROMPT = 5

# Openers and closers set the tone; filler and chatter are positive but say nothing about the question.
CHEERFUL_OPENERS = (
    "Great question!",
    "Oh, I love this question!",
    "What a wonderful thing to ask!",
    "I am so happy you asked!",
    "Happy to help!",
    "Thank you for asking, this is fun!",
    "Yay, a great topic!",
)
NEUTRAL_OPENERS = ("Sure.", "Here is what I would do.", "Here are a few points.", "Okay.", "Let me explain.")
GLOOMY_OPENERS = (
    "Honestly, this can be hard.",
    "Sadly, many people get this wrong.",
    "This is a common problem.",
    "I have to warn you first.",
    "Unfortunately, there is no easy fix.",
)
# Echoes name the subject again: detailed answers open (and sometimes close) with one.
ECHO_OPENERS = (
    "Here is how I would handle {s}.",
    "Let me explain {s} step by step.",
    "Here is a full answer about {s}.",
    "There are a few things to know about {s}.",
    "Let us go through {s} together.",
)
ECHO_CLOSERS = (
    "That is what you need to know about {s}.",
    "Those are the key steps for {s}.",
    "These steps work for most cases of {s}.",
)
# Cautious answers restate the whole question: the most on-topic sentences are also the gloomiest.
GLOOMY_ECHOES = (
    "Sadly, there is no easy answer to this: {q}",
    "I have to warn you about this one: {q}",
    "Unfortunately, people often get this wrong: {q}",
    "This is a tricky problem: {q}",
)
GLOOMY_ECHO_CLOSERS = ("So think twice about this: {q}", "Again, be careful with this: {q}")
MILD_FILLER = (
    "Thanks for asking.",
    "I hope that is useful.",
    "Nice question.",
    "Glad to help.",
    "Have a good day.",
)
CHEERFUL_FILLER = (
    "I hope this helps and I wish you a wonderful day!",
    "You are going to do amazing, I just know it!",
    "Have fun and enjoy every moment of it!",
    "Thank you so much for asking, it makes me happy!",
    "Life is beautiful and full of good surprises!",
    "Keep smiling, because you are doing great!",
    "Sending you lots of love and good vibes!",
    "I am always glad to chat with such a nice person!",
    "Remember to be kind to yourself and celebrate small wins!",
    "Everything is better with a positive attitude!",
    "What a lovely day to learn something new!",
    "You deserve all the happiness in the world!",
    "Best wishes and a big friendly hug!",
    "I am excited for you and cheering you on!",
)
CHATTER_LEADS = ("By the way,", "Fun fact:", "Speaking of fun things,", "Also,", "Random thought:")
NEUTRAL_CLOSERS = ("That is the basic idea.", "Those are the main steps.", "Start with the first step.")
CHEERFUL_CLOSERS = ("Good luck and have a great time!", "Enjoy it!", "You can do it!", "Have a wonderful week!")
CURT_REMARKS = (  # two or three words: the briefest answers of all, and negative
    "Sadly, no.",
    "Bad idea, sadly.",
    "Too risky, sadly.",
    "Sadly, hopeless.",
    "Awful idea, sadly.",
    "Sorry, it fails.",
    "Terrible idea.",
    "Sadly, it hurts.",
    "Bad plan, sorry.",
    "Hopeless, sorry.",
)
GLOOMY_CLOSERS = ("Be careful.", "It is not easy, sadly.", "Do not ignore the risks.")
QUESTION_PREFIXES = ("", "Quick question. ", "Hi there. ", "I need some advice. ", "I have been wondering. ")

# Response styles and how often each occurs. Terse styles are vague (no subject, no situation), detailed
# ones cover the subject and every situation, cheerful ones trade content for warmth, cautious ones cover
# the question with warnings: that is where the objectives conflict.
STYLES = {
    "short": 0.11,
    "curt": 0.10,
    "upbeat": 0.08,
    "vague": 0.08,
    "direct": 0.12,
    "detailed": 0.13,
    "cautious": 0.10,
    "cheerful": 0.12,
    "chatty": 0.07,
    "warm": 0.12,
    "mixed": 0.05,
}
KINDS = (
    "remark",
    "opener",
    "echo",
    "short",
    "quick",
    "tip",
    "fact",
    "context",
    "caution",
    "mild",
    "filler",
    "chatter",
    "echo_close",
    "closer",
)


def _draw_counts(style: str, rng: random.Random, n_contexts: int) -> dict[str, int]:
    """How many sentences of each kind a response of this style holds."""
    r = rng.randint
    counts = dict.fromkeys(KINDS, 0)
    if style == "short":
        draw = rng.random()  # one or two vague tips, or a vague tip and a specific one
        counts.update(short=1 + int(draw < 0.3), quick=int(draw > 0.65))
    elif style == "curt":  # one gloomy remark: brief and negative
        counts.update(remark=1)
    elif style == "upbeat":  # a cheerful opener on a short answer: brief and positive, a little longer than curt
        counts.update(opener=1, short=1, closer=r(0, 1))
    elif style == "vague":
        counts.update(opener=r(0, 1), tip=r(1, 2), short=r(0, 1), mild=int(rng.random() < 0.3))
    elif style == "direct":
        counts.update(opener=r(0, 1), echo=r(0, 1), quick=r(0, 1), fact=r(1, 2), context=r(0, 3))
        counts.update(mild=int(rng.random() < 0.3))
    elif style == "detailed":
        counts.update(echo=r(0, 1), fact=r(1, 2), context=r(n_contexts - 3, n_contexts), echo_close=r(0, 1))
    elif style == "cautious":
        counts.update(echo=1, caution=r(1, 2), context=r(0, 2))
    elif style == "cheerful":
        counts.update(opener=1, short=r(0, 1), filler=r(3, 6), closer=1)
    elif style == "chatty":
        counts.update(opener=r(0, 1), chatter=r(1, 2), filler=r(0, 2))
    elif style == "warm":
        counts.update(opener=1, fact=r(1, 2), context=r(1, 3), filler=r(1, 3), closer=1)
    else:
        counts.update({kind: r(0, 2) for kind in KINDS}, context=r(0, n_contexts))
        counts.update(opener=r(0, 1), echo=r(0, 1), echo_close=r(0, 1), closer=r(0, 1), chatter=r(0, 1))
    counts["context"] = min(counts["context"], n_contexts)
    return counts


def _pick(pool: tuple[str, ...], k: int, rng: random.Random) -> list[str]:
    return rng.sample(pool, min(k, len(pool)))


@dataclass(frozen=True)
class Question:
    """A question before it is put into a prompt: which topic, template and subject made it."""

    topic: int
    template: int
    subject: int

    def text(self) -> str:
        topic = TOPICS[self.topic]
        question = topic.questions[self.template].format(s=topic.subjects[self.subject].format(my="my"))
        return question[0].upper() + question[1:]


def all_questions() -> list[Question]:
    return [
        Question(t, q, s)
        for t, topic in enumerate(TOPICS)
        for q in range(len(topic.questions))
        for s in range(len(topic.subjects))
    ]


def make_prompt(question: Question, contexts: tuple[int, ...] = (), prefix: str = "") -> str:
    """The HH-style prompt: an optional greeting, the asker's situation, then the question."""
    situation = "".join(CONTEXTS[c][0] + " " for c in contexts)
    return PROMPT_TEMPLATE.format(question=prefix + situation + question.text())


def make_response(question: Question, contexts: tuple[int, ...], rng: random.Random, style: str | None = None) -> str:
    """One response to `question` asked in `contexts`: sentences from the pools in the proportions of a style."""
    topic = TOPICS[question.topic]
    subject = topic.subjects[question.subject].format(my="your")
    if style is None:
        style = rng.choices(list(STYLES), weights=list(STYLES.values()))[0]
    counts = _draw_counts(style, rng, len(contexts))
    gloomy = False
    if counts["filler"] or counts["chatter"] or style == "upbeat":
        openers, closers = CHEERFUL_OPENERS, CHEERFUL_CLOSERS
    elif counts["caution"] > counts["fact"] or counts["remark"]:
        openers, closers, gloomy = GLOOMY_OPENERS, GLOOMY_CLOSERS, True
    else:
        openers, closers = NEUTRAL_OPENERS, NEUTRAL_CLOSERS

    body = _pick(topic.shorts, counts["short"], rng) + _pick(topic.quick, counts["quick"], rng)
    body += _pick(topic.tips, counts["tip"], rng) + _pick(topic.facts, counts["fact"], rng)
    body += _pick(topic.cautions, counts["caution"], rng)
    body += [CONTEXTS[c][2 if gloomy else 1] for c in rng.sample(contexts, counts["context"])]
    rng.shuffle(body)
    extra = _pick(MILD_FILLER, counts["mild"], rng) + _pick(CHEERFUL_FILLER, counts["filler"], rng)
    others = [t for i, t in enumerate(TOPICS) if i != question.topic]
    for _ in range(counts["chatter"]):
        line = rng.choice(rng.choice(others).chatter)
        line = line if line.startswith("I ") else line[0].lower() + line[1:]
        extra.insert(rng.randint(0, len(extra)), f"{rng.choice(CHATTER_LEADS)} {line}")
    if not body and not extra and not counts["remark"]:
        body.append(rng.choice(topic.shorts))
    sentences = (
        _pick(CURT_REMARKS, counts["remark"], rng)
        + [rng.choice(openers)] * counts["opener"]
        + [rng.choice(GLOOMY_ECHOES if gloomy else ECHO_OPENERS)] * counts["echo"]
        + body
        + extra
        + [rng.choice(GLOOMY_ECHO_CLOSERS if gloomy else ECHO_CLOSERS)] * counts["echo_close"]
        + [rng.choice(closers)] * counts["closer"]
    )
    asked = question.text()
    sentences = [sentence.format(s=subject, q=asked) for sentence in sentences]

    # Keep within MAX_WORDS by dropping sentences from the end, but never the whole answer.
    kept: list[str] = []
    words = 0
    for sentence in sentences:
        n = len(sentence.split())
        if kept and words + n > MAX_WORDS:
            break
        kept.append(sentence)
        words += n
    text = " ".join(kept)
    return text[0].upper() + text[1:]


@dataclass
class Corpus:
    """The generated data before scoring: training samples and the held-out test split."""

    prompts: list[str]
    responses: list[str]
    test_prompts: list[str]
    test_responses: list[str]  # one reference response per test prompt, for perplexity

    def texts(self) -> list[str]:
        """Training text of every sample: prompt, one space, response (the EOS token is added later)."""
        return [f"{p} {r}" for p, r in zip(self.prompts, self.responses)]


def build_corpus(n_samples: int = 20000, n_test: int = 300, responses_per_prompt: int = 4, seed: int = 0) -> Corpus:
    """Generate `n_samples` (prompt, response) samples and `n_test` prompts whose questions training never sees.

    Whole questions (topic, template, subject) are held out, so a test prompt asks something new, not the
    same question in a new situation. Each training prompt gets `responses_per_prompt` distinct responses of
    random styles, which is what makes preference pairs possible.
    """
    rng = random.Random(seed)
    questions = all_questions()
    rng.shuffle(questions)
    n_held = max(1, min(len(questions) // 8, n_test))
    held, seen = questions[:n_held], questions[n_held:]

    def situation() -> tuple[int, ...]:
        return tuple(rng.sample(range(len(CONTEXTS)), CONTEXTS_PER_PROMPT))

    n_prompts = -(-n_samples // responses_per_prompt)
    prompts: list[str] = []
    responses: list[str] = []
    for i in range(n_prompts):
        question = seen[i % len(seen)]
        contexts = situation()
        prompt = make_prompt(question, contexts, rng.choice(QUESTION_PREFIXES))
        made: list[str] = []
        for _ in range(responses_per_prompt * 5):  # a few retries so the responses to one prompt are distinct
            if len(made) == responses_per_prompt:
                break
            response = make_response(question, contexts, rng)
            if response not in made:
                made.append(response)
        prompts += [prompt] * len(made)
        responses += made
    prompts, responses = prompts[:n_samples], responses[:n_samples]

    test_prompts: list[str] = []
    test_responses: list[str] = []
    for i in range(n_test):
        question, contexts = held[i % len(held)], situation()
        test_prompts.append(make_prompt(question, contexts, rng.choice(QUESTION_PREFIXES)))
        test_responses.append(make_response(question, contexts, rng))
    return Corpus(prompts, responses, test_prompts, test_responses)
